"""Fused (x + add) -> GroupNorm -> affine -> SiLU, forward and backward, in Triton.

Math, per sample n and group g of Cg = C / G channels, over the M = Cg * L elements of the group
(L = product of the spatial sizes), all in float32 whatever the I/O dtype:

    u[n,c,l]  = x[n,c,l] + add[n,c]                      (add optional: a ResBlock's time embedding)
    mean      = sum(u) / M                                (per (n, g))
    rstd      = 1 / sqrt(sum((u - mean)^2) / M + eps)     (biased variance)
    xhat      = (u - mean) * rstd
    z         = xhat * weight[c] + bias[c]
    y         = z * sigmoid(z)   if ACT  else  z

Backward, with s = sigmoid(z):

    dz        = dy * s * (1 + z * (1 - s))   if ACT  else  dy
    dbias[c]  = sum_{n,l} dz                  dweight[c] = sum_{n,l} dz * xhat
    dxhat     = dz * weight[c]
    du        = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))    (mean_g over the group)
    dx        = du                            dadd[n,c]  = sum_l du[n,c,l]

mean_g(dxhat) and mean_g(dxhat * xhat) need a whole-group reduction before any du can be written,
so the backward kernel makes two passes over its groups (one when they fit one tile: then the tile
stays in registers and x, dy are read once). Both group sums are built from per-channel sums,
sum_c weight[c] * S_dz[c] and sum_c weight[c] * S_dzx[c], and those per-channel sums are exactly the
per-sample partials of dbias and dweight: the kernel writes them to one (2, N, C) float32 buffer and
a second small kernel sums them over N in a fixed order (deterministic, no atomics) and casts them.

Layout: x is viewed as (N, C, L), either NCHW-contiguous (element (n,c,l) at n*C*L + c*L + l) or
channels-last (n*C*L + l*C + c); y, dy and dx share x's layout. The tile's LAST axis (the one Triton
vectorises and coalesces along) is always the contiguous memory axis: tiles are [BLOCK_C, BLOCK_L]
for NCHW and [BLOCK_L, BLOCK_C] for channels-last.

One program per (n, block of GPP consecutive groups), grid (N * cdiv(G, GPP),). The channel axis of
a tile holds GPP groups of CG_P2 = next_pow2(Cg) slots each (slot j: group j // CG_P2, channel
j % CG_P2 of it; slots past Cg are masked). GPP > 1 is used for channels-last, where one group's
channels are only Cg * itemsize bytes of each memory row: several groups per program make each row
access at least ~64 bytes wide. Per-group sums of per-channel vectors are taken with a [BLOCK_C,
BLOCK_C] same-group mask (GPP > 1) or a plain sum (GPP == 1).
A program walks its groups in tiles of BLOCK_L positions (and, for GPP == 1 with Cg > BLOCK_C, in
channel chunks of BLOCK_C). Statistics: one tile -> two-pass (mean, then centred sum of squares) in
registers; several tiles -> per-lane Welford, a Chan combine along L, then the exact parallel
formula across the channels of a group.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import FMA
from .group_norm_silu_rows import rows_bwd, rows_fwd, sizes
from .group_norm_silu_tiles import (_bc, _chan, _chan_params, _gsum, _load_add, _load_u, _lsum, _offs,
                                    _program_groups, _welford_combine)

__all__ = ["group_norm_silu_fwd", "group_norm_silu_bwd", "block_sizes", "MAX_TILE"]

# Defaults from a sweep on an H200 (bf16, channels-last, 96x256x16x16 and 96x128x32x32, GPU time of
# forward+backward in a CUDA graph): one tile per program wins over the looping paths, and two to four
# groups per program (32-byte rows) over one (16- and 8-byte rows): 55.6 and 113 us against 59.9 and
# 177 us with one group per program and 69.7 and 189 us with 64-byte rows.
MAX_TILE = 16384     # elements of one tile (GPP * CG_P2 * BLOCK_L): 4 groups of 4 ch x 1024 (UNet at 32x32)
# At 32x32 that tile takes 16 warps, so 128 registers a thread, and the backward kernel spills 104 bytes a
# thread (ptxas for sm_90); MAX_TILE = 8192 does not spill but loops over two tiles. The sweep above found
# one tile faster than the looping paths it timed; bench gn_sweep's groups_t8k variant times the 8192 tile.
MAX_BLOCK_C = 64     # channel slots of one tile; wider groups loop over channel chunks too
ROW_BYTES = 32       # channels-last: aim for >= this many contiguous bytes per memory row of a tile
MAX_GPP = 16         # at most this many groups per program
MIN_PROGRAMS = 512   # channels-last: no more groups per program once that would leave fewer programs
# Channels-last launches: "groups" (the kernels of this file: a program holds whole groups, one launch
# each way) or "rows" (kernels/group_norm_silu_rows.py: tiles of whole rows, split reductions, three
# launches each way). NCHW launches always use "groups". Read at each launch; the GPU sweep
# (bench gn_sweep) compares the two.
STRATEGY = "groups"
STRATEGIES = ("groups", "rows")


@triton.jit
def _gn_silu_fwd_kernel(
    x_ptr,       # (N, C, L) input, NCHW- or channels-last-contiguous, fp32/bf16/fp16
    add_ptr,     # (N, C) contiguous, x's dtype; unused unless HAS_ADD
    w_ptr,       # (C,) weight, x's dtype or fp32
    b_ptr,       # (C,) bias, x's dtype or fp32
    y_ptr,       # (N, C, L) output, x's dtype and layout
    mean_ptr,    # (N, G) fp32 out: group means
    rstd_ptr,    # (N, G) fp32 out: 1 / sqrt(var + eps)
    C, L, Cg, G, NGB, M, eps,   # M = Cg * L as a float
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr, ONE_TILE: tl.constexpr,
    GPP: tl.constexpr, CG_P2: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n, g0, base = _program_groups(C, L, NGB, GPP)
    x_ptr += base
    y_ptr += base

    if ONE_TILE:
        c, k, cmask = _chan(g0, 0, Cg, G, GPP, CG_P2)
        off, mask = _offs(c, cmask, 0, C, L, CL, BLOCK_L)
        a = _load_add(add_ptr, n, c, cmask, C, HAS_ADD)
        u = _load_u(x_ptr, off, mask, a, CL, HAS_ADD)
        mean = _gsum(_lsum(u, CL), k, GPP) / M
        d = tl.where(mask, u - _bc(mean, CL), 0.0)
        var = _gsum(_lsum(d * d, CL), k, GPP) / M
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        z = d * _bc(rstd * w, CL) + _bc(b, CL)
        if ACT:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + off, z.to(y_ptr.dtype.element_ty), mask=mask)
        kmask = (c % Cg == 0) & cmask  # one slot per group writes its statistics
    else:
        # pass 1: per-lane Welford over every tile of the groups, a combine along L per channel
        # slot, then the exact parallel formula across the slots of a group
        if CL:
            acc_mean = tl.zeros([BLOCK_L, GPP * CG_P2], dtype=tl.float32)
        else:
            acc_mean = tl.zeros([GPP * CG_P2, BLOCK_L], dtype=tl.float32)
        acc_m2 = tl.zeros_like(acc_mean)
        acc_n = tl.zeros_like(acc_mean)
        for c0 in range(0, Cg, CG_P2):
            c, k, cmask = _chan(g0, c0, Cg, G, GPP, CG_P2)
            a = _load_add(add_ptr, n, c, cmask, C, HAS_ADD)
            for l0 in range(0, L, BLOCK_L):
                off, mask = _offs(c, cmask, l0, C, L, CL, BLOCK_L)
                u = _load_u(x_ptr, off, mask, a, CL, HAS_ADD)
                new_n = acc_n + mask.to(tl.float32)
                delta = u - acc_mean
                acc_mean += tl.where(mask, delta / tl.maximum(new_n, 1.0), 0.0)
                acc_m2 += tl.where(mask, delta * (u - acc_mean), 0.0)
                acc_n = new_n
        if CL:
            ch_mean, ch_m2, ch_n = tl.reduce((acc_mean, acc_m2, acc_n), 0, _welford_combine)
        else:
            ch_mean, ch_m2, ch_n = tl.reduce((acc_mean, acc_m2, acc_n), 1, _welford_combine)
        c, k, cmask = _chan(g0, 0, Cg, G, GPP, CG_P2)
        mean = _gsum(ch_n * ch_mean, k, GPP) / M
        dm = ch_mean - mean
        m2 = _gsum(ch_m2 + ch_n * dm * dm, k, GPP)
        rstd = 1.0 / tl.sqrt_rn(m2 / M + eps)
        kmask = (c % Cg == 0) & cmask
        # pass 2: normalise, affine, SiLU
        for c0 in range(0, Cg, CG_P2):
            c, k, cmask, a, w, b = _chan_params(add_ptr, w_ptr, b_ptr, n, g0, c0, C, Cg, G, HAS_ADD, GPP, CG_P2)
            scale = _bc(rstd * w, CL)
            shift = _bc(b, CL)
            mean_b = _bc(mean, CL)
            for l0 in range(0, L, BLOCK_L):
                off, mask = _offs(c, cmask, l0, C, L, CL, BLOCK_L)
                u = _load_u(x_ptr, off, mask, a, CL, HAS_ADD)
                z = tl.where(mask, u - mean_b, 0.0) * scale + shift
                if ACT:
                    z = z * tl.sigmoid(z)
                tl.store(y_ptr + off, z.to(y_ptr.dtype.element_ty), mask=mask)
    # slot j of a group with channel 0 (c0 == 0) stores that group's statistics
    gidx = n * G + g0 + k
    tl.store(mean_ptr + gidx, mean, mask=kmask)
    tl.store(rstd_ptr + gidx, rstd, mask=kmask)


@triton.jit
def _dz_tile(dy_ptr, x_ptr, off, mask, a, w, b, mean, rstd, CL: tl.constexpr,
             HAS_ADD: tl.constexpr, ACT: tl.constexpr):
    """(xhat, dz) of one tile in float32, both 0 where masked; a, w, b, mean, rstd per channel slot."""
    u = _load_u(x_ptr, off, mask, a, CL, HAS_ADD)
    xhat = tl.where(mask, (u - _bc(mean, CL)) * _bc(rstd, CL), 0.0)
    dz = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        z = xhat * _bc(w, CL) + _bc(b, CL)
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    return xhat, dz


@triton.jit
def _gn_silu_bwd_kernel(
    dy_ptr,      # (N, C, L) upstream gradient, x's dtype and layout
    x_ptr,       # (N, C, L) forward input
    add_ptr,     # (N, C) forward add; unused unless HAS_ADD
    w_ptr,       # (C,) weight
    b_ptr,       # (C,) bias (SiLU's derivative needs z)
    mean_ptr,    # (N, G) fp32 from the forward
    rstd_ptr,    # (N, G) fp32 from the forward
    dx_ptr,      # (N, C, L) out: dx, x's dtype and layout
    part_ptr,    # (2, N, C) fp32 out: per-sample partials [sum_l dz * xhat (dweight), sum_l dz (dbias)]
    dadd_ptr,    # (N, C) out, add's dtype: sum_l dx; unused unless HAS_ADD
    N, C, L, Cg, G, NGB, inv_m,   # inv_m = 1 / (Cg * L)
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr, ONE_TILE: tl.constexpr,
    GPP: tl.constexpr, CG_P2: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n, g0, base = _program_groups(C, L, NGB, GPP)
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    dwp_ptr = part_ptr + n * C
    dbp_ptr = part_ptr + N * C + n * C
    c, k, cmask = _chan(g0, 0, Cg, G, GPP, CG_P2)
    gmask = g0 + k < G
    mean = tl.load(mean_ptr + n * G + g0 + k, mask=gmask, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + g0 + k, mask=gmask, other=0.0)

    if ONE_TILE:
        c, k, cmask, a, w, b = _chan_params(add_ptr, w_ptr, b_ptr, n, g0, 0, C, Cg, G, HAS_ADD, GPP, CG_P2)
        off, mask = _offs(c, cmask, 0, C, L, CL, BLOCK_L)
        xhat, dz = _dz_tile(dy_ptr, x_ptr, off, mask, a, w, b, mean, rstd, CL, HAS_ADD, ACT)
        s_dz = _lsum(dz, CL)
        s_dzx = _lsum(dz * xhat, CL)
        tl.store(dbp_ptr + c, s_dz, mask=cmask)
        tl.store(dwp_ptr + c, s_dzx, mask=cmask)
        c1 = _gsum(w * s_dz, k, GPP) * inv_m
        c2 = _gsum(w * s_dzx, k, GPP) * inv_m
        du = tl.where(mask, _bc(rstd, CL) * (dz * _bc(w, CL) - _bc(c1, CL) - xhat * _bc(c2, CL)), 0.0)
        tl.store(dx_ptr + off, du.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_ADD:
            tl.store(dadd_ptr + n * C + c, _lsum(du, CL).to(dadd_ptr.dtype.element_ty), mask=cmask)
    else:
        # pass 1: per-channel sums of dz and dz * xhat (the dbias / dweight partials), group sums
        c1 = tl.zeros_like(mean)
        c2 = tl.zeros_like(mean)
        for c0 in range(0, Cg, CG_P2):
            c, k, cmask, a, w, b = _chan_params(add_ptr, w_ptr, b_ptr, n, g0, c0, C, Cg, G, HAS_ADD, GPP, CG_P2)
            s_dz = tl.zeros_like(mean)
            s_dzx = tl.zeros_like(mean)
            for l0 in range(0, L, BLOCK_L):
                off, mask = _offs(c, cmask, l0, C, L, CL, BLOCK_L)
                xhat, dz = _dz_tile(dy_ptr, x_ptr, off, mask, a, w, b, mean, rstd, CL, HAS_ADD, ACT)
                s_dz += _lsum(dz, CL)
                s_dzx += _lsum(dz * xhat, CL)
            tl.store(dbp_ptr + c, s_dz, mask=cmask)
            tl.store(dwp_ptr + c, s_dzx, mask=cmask)
            c1 += _gsum(w * s_dz, k, GPP)
            c2 += _gsum(w * s_dzx, k, GPP)
        c1 = c1 * inv_m
        c2 = c2 * inv_m
        # pass 2: dx (and dadd = its per-channel sum)
        for c0 in range(0, Cg, CG_P2):
            c, k, cmask, a, w, b = _chan_params(add_ptr, w_ptr, b_ptr, n, g0, c0, C, Cg, G, HAS_ADD, GPP, CG_P2)
            s_du = tl.zeros_like(mean)
            for l0 in range(0, L, BLOCK_L):
                off, mask = _offs(c, cmask, l0, C, L, CL, BLOCK_L)
                xhat, dz = _dz_tile(dy_ptr, x_ptr, off, mask, a, w, b, mean, rstd, CL, HAS_ADD, ACT)
                du = tl.where(mask, _bc(rstd, CL) * (dz * _bc(w, CL) - _bc(c1, CL) - xhat * _bc(c2, CL)), 0.0)
                tl.store(dx_ptr + off, du.to(dx_ptr.dtype.element_ty), mask=mask)
                s_du += _lsum(du, CL)
            if HAS_ADD:
                tl.store(dadd_ptr + n * C + c, s_du.to(dadd_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _sum_partials_kernel(
    part_ptr,    # (2, N, C) fp32 per-sample partials from _gn_silu_bwd_kernel
    dw_ptr,      # (C,) out, weight's dtype: sum over n of part[0]
    db_ptr,      # (C,) out, bias's dtype: sum over n of part[1]
    N, C,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fixed-order (deterministic) sums over N of the dweight / dbias partials, BLOCK_N rows at a time."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    acc_w = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cm[None, :]
        off = ns[:, None] * C + cs[None, :]
        acc_w += tl.load(part_ptr + off, mask=m, other=0.0)
        acc_b += tl.load(part_ptr + N * C + off, mask=m, other=0.0)
    tl.store(dw_ptr + cs, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=cm)
    tl.store(db_ptr + cs, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------------------------
# host launchers


@functools.lru_cache(maxsize=1024)
def _config(N: int, G: int, Cg: int, L: int, channels_last: bool, itemsize: int, max_tile: int,
            max_block_c: int, row_bytes: int, max_gpp: int, min_programs: int):
    """(GPP, CG_P2, BLOCK_L, ONE_TILE, num_warps) for a launch (see block_sizes)."""
    cg_p2 = triton.next_power_of_2(Cg)
    cap_c = triton.next_power_of_2(max(1, max_block_c))
    gpp = 1
    if cg_p2 > cap_c:
        cg_p2 = cap_c                     # channel chunks of one group
    elif channels_last:
        # several groups per program so that each memory row of a tile is >= row_bytes wide, while
        # keeping >= min_programs (MIN_PROGRAMS) programs (parallelism) and the channel slots <= max_block_c
        gpp_cap = min(max_gpp, triton.next_power_of_2(G), max(1, cap_c // cg_p2))
        while gpp < gpp_cap and cg_p2 * gpp * itemsize < row_bytes and N * triton.cdiv(G, 2 * gpp) >= min_programs:
            gpp *= 2
    block_c = gpp * cg_p2
    block_l = max(1, min(triton.next_power_of_2(L), max(1, max_tile // block_c)))
    one_tile = cg_p2 >= Cg and block_l >= L
    tile = block_c * block_l
    num_warps = 1 if tile <= 128 else 2 if tile <= 512 else 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return gpp, cg_p2, block_l, one_tile, num_warps


def block_sizes(Cg: int, L: int, max_tile: Optional[int] = None, max_block_c: Optional[int] = None, *,
                N: int = 1, G: int = 1, channels_last: bool = False, itemsize: int = 4):
    """(GPP, CG_P2, BLOCK_L, ONE_TILE): groups per program, channel slots per group (a power of two;
    < Cg means channel chunks), positions per tile, and whether one tile holds all the program's
    groups. GPP * CG_P2 <= max_block_c and GPP * CG_P2 * BLOCK_L <= max_tile (BLOCK_L >= 1); the
    defaults are the module's MAX_TILE and MAX_BLOCK_C, read at each call (tests lower them to
    exercise the multi-tile loops on small shapes)."""
    return _config(N, G, Cg, L, bool(channels_last), itemsize, MAX_TILE if max_tile is None else max_tile,
                   MAX_BLOCK_C if max_block_c is None else max_block_c, ROW_BYTES, MAX_GPP, MIN_PROGRAMS)[:4]


def _check_layout(t: torch.Tensor, channels_last: bool, name: str) -> None:
    ok = t.movedim(1, -1).is_contiguous() if channels_last else t.is_contiguous()
    if not ok:
        raise ValueError(f"group_norm_silu kernels: {name} must be {'channels-last' if channels_last else 'NCHW'}"
                         f"-contiguous, got strides {t.stride()}")


def _launch_config(x: torch.Tensor, G: int, channels_last: bool, max_tile, max_block_c):
    N, C, L, _, Cg = sizes(x, G)
    cfg = _config(N, G, Cg, L, bool(channels_last), x.element_size(), MAX_TILE if max_tile is None else max_tile,
                  MAX_BLOCK_C if max_block_c is None else max_block_c, ROW_BYTES, MAX_GPP, MIN_PROGRAMS)
    return N, C, L, Cg, cfg


def group_norm_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add, num_groups: int,
                        eps: float, act: bool, channels_last: bool, *, max_tile: Optional[int] = None,
                        max_block_c: Optional[int] = None):
    """Launches the forward kernel (one launch). x: (N, C, *spatial), NCHW-contiguous or
    (channels_last=True) channels-last-contiguous; weight, bias: (C,) contiguous; add: (N, C)
    contiguous or None. Returns (y like x, mean (N, G) fp32, rstd (N, G) fp32). No validation beyond
    the layout: the op in cbdm_fast.ops.group_norm_silu validates."""
    _check_layout(x, channels_last, "x")
    if channels_last and _strategy() == "rows":
        return rows_fwd(x, weight, bias, add, num_groups, eps, act)
    G = num_groups
    N, C, L, Cg, (gpp, cg_p2, block_l, one_tile, num_warps) = _launch_config(x, G, channels_last, max_tile,
                                                                             max_block_c)
    y = torch.empty_like(x)  # same strides as x (x is dense)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    ngb = triton.cdiv(G, gpp)
    _gn_silu_fwd_kernel[(N * ngb,)](
        x, add if add is not None else x, weight, bias, y, mean, rstd,
        C, L, Cg, G, ngb, float(Cg * L), float(eps),
        HAS_ADD=add is not None, ACT=bool(act), CL=bool(channels_last), ONE_TILE=one_tile,
        GPP=gpp, CG_P2=cg_p2, BLOCK_L=block_l, num_warps=num_warps, **FMA,
    )
    return y, mean, rstd


def group_norm_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add,
                        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: bool, channels_last: bool,
                        *, max_tile: Optional[int] = None, max_block_c: Optional[int] = None):
    """Launches the backward kernel, then the kernel that sums the (2, N, C) fp32 partials of dweight
    and dbias over N in a fixed order (deterministic) and casts them (two launches in all). dy must
    have x's layout; mean, rstd contiguous (N, G). Returns
    (dx like x, dweight (C,) weight's dtype, dbias (C,) bias's dtype, dadd (N, C) add's dtype or None)."""
    _check_layout(x, channels_last, "x")
    _check_layout(dy, channels_last, "dy")
    if channels_last and _strategy() == "rows":
        dx, part, dadd = rows_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, act)
        return (dx,) + _sum_over_samples(part, weight, bias) + (dadd,)
    G = num_groups
    N, C, L, Cg, (gpp, cg_p2, block_l, one_tile, num_warps) = _launch_config(x, G, channels_last, max_tile,
                                                                             max_block_c)
    dx = torch.empty_like(x)
    part = torch.empty((2, N, C), device=x.device, dtype=torch.float32)
    dadd = torch.empty((N, C), device=x.device, dtype=add.dtype) if add is not None else None
    ngb = triton.cdiv(G, gpp)
    _gn_silu_bwd_kernel[(N * ngb,)](
        dy, x, add if add is not None else x, weight, bias, mean, rstd,
        dx, part, dadd if dadd is not None else part,
        N, C, L, Cg, G, ngb, 1.0 / (Cg * L),
        HAS_ADD=add is not None, ACT=bool(act), CL=bool(channels_last), ONE_TILE=one_tile,
        GPP=gpp, CG_P2=cg_p2, BLOCK_L=block_l, num_warps=num_warps, **FMA,
    )
    return (dx,) + _sum_over_samples(part, weight, bias) + (dadd,)


def _strategy() -> str:
    if STRATEGY not in STRATEGIES:
        raise ValueError(f"group_norm_silu kernels: STRATEGY must be one of {STRATEGIES}, got {STRATEGY!r}")
    return STRATEGY


def _sum_over_samples(part: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(dweight, dbias): the (2, N, C) fp32 per-sample partials summed over N in a fixed order, cast to
    weight's / bias's dtype (one launch)."""
    _, N, C = part.shape
    dweight = torch.empty((C,), device=part.device, dtype=weight.dtype)
    dbias = torch.empty((C,), device=part.device, dtype=bias.dtype)
    block_c = min(32, triton.next_power_of_2(C))
    block_n = min(64, triton.next_power_of_2(N))
    _sum_partials_kernel[(triton.cdiv(C, block_c),)](part, dweight, dbias, N, C, BLOCK_N=block_n, BLOCK_C=block_c,
                                                     num_warps=4 if block_n * block_c >= 1024 else 1, **FMA)
    return dweight, dbias
