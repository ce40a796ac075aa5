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
so the backward kernel makes two passes over its group (one when the group fits one tile: then the
tile stays in registers). Both group sums are built from per-channel sums, sum_c weight[c] *
S_dz[c] and sum_c weight[c] * S_dzx[c], and those per-channel sums are exactly the per-sample
partials of dbias and dweight: the kernel writes them to (N, C) float32 buffers and the host sums
them over N (a fixed-order torch reduction: deterministic, no atomics).

Layout: x is viewed as (N, C, L), either NCHW-contiguous (element (n,c,l) at n*C*L + c*L + l) or
channels-last (n*C*L + l*C + c); y, dy and dx share x's layout. One program per (n, g), grid (N*G,).
A program walks its group in tiles of BLOCK_C channels x BLOCK_L positions. Statistics: one tile ->
two-pass (mean, then centred sum of squares) in registers; several tiles -> per-lane Welford then a
Chan combine across lanes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["group_norm_silu_fwd", "group_norm_silu_bwd", "block_sizes", "INTERPRETED", "MAX_TILE"]

# True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 set before triton's
# import): they then run on CPU tensors.
INTERPRETED = False  # set below, once the kernels exist

MAX_TILE = 4096      # elements of one tile (BLOCK_C * BLOCK_L): a group of the UNet at 32x32 (4 x 1024)
MAX_BLOCK_C = 64     # channels of one tile; wider groups loop over channel chunks too


@triton.jit
def _tile(g, c0, l0, Cg, C, L, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Channel indices (BLOCK_C,), their mask, element offsets within the sample (BLOCK_C, BLOCK_L)
    and the element mask of the tile starting at channel c0 of group g and position l0."""
    cc = c0 + tl.arange(0, BLOCK_C)
    ll = l0 + tl.arange(0, BLOCK_L)
    cmask = cc < Cg
    c = g * Cg + cc
    mask = cmask[:, None] & (ll < L)[None, :]
    if CHANNELS_LAST:
        off = ll[None, :] * C + c[:, None]
    else:
        off = c[:, None] * L + ll[None, :]
    return c, cmask, off, mask


@triton.jit
def _load_u(x_ptr, add_ptr, n, c, cmask, off, mask, C, HAS_ADD: tl.constexpr):
    """u = x + add[n, c] for one tile, in float32 (0 where masked)."""
    u = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        u = tl.where(mask, u + a[:, None], 0.0)
    return u


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise merge of two (mean, M2, count) summaries; safe for empty ones."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _gn_silu_fwd_kernel(
    x_ptr,       # (N, C, L) input, NCHW- or channels-last-contiguous, fp32/bf16/fp16
    add_ptr,     # (N, C) contiguous, x's dtype; unused unless HAS_ADD
    w_ptr,       # (C,) weight, x's dtype or fp32
    b_ptr,       # (C,) bias, x's dtype or fp32
    y_ptr,       # (N, C, L) output, x's dtype and layout
    mean_ptr,    # (N, G) fp32 out: group means
    rstd_ptr,    # (N, G) fp32 out: 1 / sqrt(var + eps)
    C, L, Cg, G, eps,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * C * L
    x_ptr += base
    y_ptr += base
    M = (Cg * L).to(tl.float32)

    if ONE_TILE:
        c, cmask, off, mask = _tile(g, 0, 0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
        u = _load_u(x_ptr, add_ptr, n, c, cmask, off, mask, C, HAS_ADD)
        mean = tl.sum(tl.sum(u, axis=1), axis=0) / M
        d = tl.where(mask, u - mean, 0.0)
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) / M
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        z = d * (rstd * w)[:, None] + b[:, None]
        if ACT:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + off, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: per-lane Welford over every tile of the group, then one combine across lanes
        acc_mean = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        acc_m2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        acc_n = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        for c0 in range(0, Cg, BLOCK_C):
            for l0 in range(0, L, BLOCK_L):
                c, cmask, off, mask = _tile(g, c0, l0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
                u = _load_u(x_ptr, add_ptr, n, c, cmask, off, mask, C, HAS_ADD)
                new_n = acc_n + mask.to(tl.float32)
                delta = u - acc_mean
                acc_mean += tl.where(mask, delta / tl.maximum(new_n, 1.0), 0.0)
                acc_m2 += tl.where(mask, delta * (u - acc_mean), 0.0)
                acc_n = new_n
        acc_mean, acc_m2, acc_n = tl.reduce((acc_mean, acc_m2, acc_n), 1, _welford_combine)
        mean, m2, _n = tl.reduce((acc_mean, acc_m2, acc_n), 0, _welford_combine)
        rstd = 1.0 / tl.sqrt_rn(m2 / M + eps)
        # pass 2: normalise, affine, SiLU
        for c0 in range(0, Cg, BLOCK_C):
            c, cmask, _off, _mask = _tile(g, c0, 0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
            w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            for l0 in range(0, L, BLOCK_L):
                c, cmask, off, mask = _tile(g, c0, l0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
                u = _load_u(x_ptr, add_ptr, n, c, cmask, off, mask, C, HAS_ADD)
                z = tl.where(mask, u - mean, 0.0) * (rstd * w)[:, None] + b[:, None]
                if ACT:
                    z = z * tl.sigmoid(z)
                tl.store(y_ptr + off, z.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def _dz_tile(dy_ptr, x_ptr, add_ptr, n, c, cmask, off, mask, w, b, mean, rstd, C,
             HAS_ADD: tl.constexpr, ACT: tl.constexpr):
    """(xhat, dz) of one tile in float32, both 0 where masked."""
    u = _load_u(x_ptr, add_ptr, n, c, cmask, off, mask, C, HAS_ADD)
    xhat = tl.where(mask, (u - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        z = xhat * w[:, None] + b[:, None]
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
    dwp_ptr,     # (N, C) fp32 out: per-sample partials of dweight, sum_l dz * xhat
    dbp_ptr,     # (N, C) fp32 out: per-sample partials of dbias, sum_l dz
    dadd_ptr,    # (N, C) out, add's dtype: sum_l dx; unused unless HAS_ADD
    C, L, Cg, G,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * C * L
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    inv_m = 1.0 / (Cg * L).to(tl.float32)

    if ONE_TILE:
        c, cmask, off, mask = _tile(g, 0, 0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        xhat, dz = _dz_tile(dy_ptr, x_ptr, add_ptr, n, c, cmask, off, mask, w, b, mean, rstd, C, HAS_ADD, ACT)
        s_dz = tl.sum(dz, axis=1)
        s_dzx = tl.sum(dz * xhat, axis=1)
        tl.store(dbp_ptr + n * C + c, s_dz, mask=cmask)
        tl.store(dwp_ptr + n * C + c, s_dzx, mask=cmask)
        c1 = tl.sum(w * s_dz, axis=0) * inv_m
        c2 = tl.sum(w * s_dzx, axis=0) * inv_m
        du = tl.where(mask, rstd * (dz * w[:, None] - c1 - xhat * c2), 0.0)
        tl.store(dx_ptr + off, du.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_ADD:
            tl.store(dadd_ptr + n * C + c, tl.sum(du, axis=1).to(dadd_ptr.dtype.element_ty), mask=cmask)
    else:
        # pass 1: per-channel sums of dz and dz * xhat (the dbias / dweight partials), group sums
        c1 = 0.0
        c2 = 0.0
        for c0 in range(0, Cg, BLOCK_C):
            c, cmask, _off, _mask = _tile(g, c0, 0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
            w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            acc_dz = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
            acc_dzx = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                c, cmask, off, mask = _tile(g, c0, l0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
                xhat, dz = _dz_tile(dy_ptr, x_ptr, add_ptr, n, c, cmask, off, mask, w, b, mean, rstd, C,
                                    HAS_ADD, ACT)
                acc_dz += dz
                acc_dzx += dz * xhat
            s_dz = tl.sum(acc_dz, axis=1)
            s_dzx = tl.sum(acc_dzx, axis=1)
            tl.store(dbp_ptr + n * C + c, s_dz, mask=cmask)
            tl.store(dwp_ptr + n * C + c, s_dzx, mask=cmask)
            c1 += tl.sum(w * s_dz, axis=0)
            c2 += tl.sum(w * s_dzx, axis=0)
        c1 = c1 * inv_m
        c2 = c2 * inv_m
        # pass 2: dx (and dadd = its per-channel sum)
        for c0 in range(0, Cg, BLOCK_C):
            c, cmask, _off, _mask = _tile(g, c0, 0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
            w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            acc_du = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                c, cmask, off, mask = _tile(g, c0, l0, Cg, C, L, CHANNELS_LAST, BLOCK_C, BLOCK_L)
                xhat, dz = _dz_tile(dy_ptr, x_ptr, add_ptr, n, c, cmask, off, mask, w, b, mean, rstd, C,
                                    HAS_ADD, ACT)
                du = tl.where(mask, rstd * (dz * w[:, None] - c1 - xhat * c2), 0.0)
                tl.store(dx_ptr + off, du.to(dx_ptr.dtype.element_ty), mask=mask)
                acc_du += du
            if HAS_ADD:
                tl.store(dadd_ptr + n * C + c, tl.sum(acc_du, axis=1).to(dadd_ptr.dtype.element_ty), mask=cmask)


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
    INTERPRETED = isinstance(_gn_silu_fwd_kernel, _InterpretedFunction)
except ImportError:  # pragma: no cover - a Triton without the interpreter
    INTERPRETED = False


# ----------------------------------------------------------------------------------------------
# host launchers


def block_sizes(Cg: int, L: int, max_tile: Optional[int] = None, max_block_c: Optional[int] = None):
    """(BLOCK_C, BLOCK_L, ONE_TILE): powers of two with BLOCK_C <= max_block_c and BLOCK_C * BLOCK_L <=
    max_tile (BLOCK_L >= 1); the defaults are the module's MAX_TILE and MAX_BLOCK_C, read at each call
    (tests lower them to exercise the multi-tile loops on small shapes)."""
    max_tile = MAX_TILE if max_tile is None else max_tile
    max_block_c = MAX_BLOCK_C if max_block_c is None else max_block_c
    block_c = min(triton.next_power_of_2(Cg), triton.next_power_of_2(max(1, max_block_c)))
    block_l = min(triton.next_power_of_2(L), max(1, max_tile // block_c))
    return block_c, block_l, (block_c >= Cg and block_l >= L)


def _num_warps(block_c: int, block_l: int) -> int:
    """Warps per program, by tile size (<= 128 registers, no spills on sm_90 at the UNet's shapes).
    Both launches also pass enable_fp_fusion=True: FMA contraction, Triton 3.9's default, stated
    explicitly because 3.10 flips that default and 3.9 warns when it is left unset."""
    tile = block_c * block_l
    return 2 if tile <= 512 else 4 if tile <= 2048 else 8


def _check_layout(t: torch.Tensor, channels_last: bool, name: str) -> None:
    ok = t.movedim(1, -1).is_contiguous() if channels_last else t.is_contiguous()
    if not ok:
        raise ValueError(f"group_norm_silu kernels: {name} must be {'channels-last' if channels_last else 'NCHW'}"
                         f"-contiguous, got strides {t.stride()}")


def group_norm_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add, num_groups: int,
                        eps: float, act: bool, channels_last: bool, *, max_tile: Optional[int] = None,
                        max_block_c: Optional[int] = None):
    """Launches the forward kernel. x: (N, C, *spatial), NCHW-contiguous or (channels_last=True)
    channels-last-contiguous; weight, bias: (C,) contiguous; add: (N, C) contiguous or None.
    Returns (y like x, mean (N, G) fp32, rstd (N, G) fp32). No validation beyond the layout:
    the op in cbdm_fast.ops.group_norm_silu validates."""
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // max(1, N * C)
    G = num_groups
    Cg = C // G
    _check_layout(x, channels_last, "x")
    y = torch.empty_like(x)  # same strides as x (x is dense)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    block_c, block_l, one_tile = block_sizes(Cg, L, max_tile, max_block_c)
    _gn_silu_fwd_kernel[(N * G,)](
        x, add if add is not None else x, weight, bias, y, mean, rstd,
        C, L, Cg, G, float(eps),
        HAS_ADD=add is not None, ACT=bool(act), CHANNELS_LAST=bool(channels_last), ONE_TILE=one_tile,
        BLOCK_C=block_c, BLOCK_L=block_l, num_warps=_num_warps(block_c, block_l), enable_fp_fusion=True,
    )
    return y, mean, rstd


def group_norm_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add,
                        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: bool, channels_last: bool,
                        *, max_tile: Optional[int] = None, max_block_c: Optional[int] = None):
    """Launches the backward kernel, then reduces the (N, C) fp32 partials of dweight and dbias over N
    with a fixed-order torch sum (deterministic). dy must have x's layout. Returns
    (dx like x, dweight (C,) weight's dtype, dbias (C,) bias's dtype, dadd (N, C) add's dtype or None)."""
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // max(1, N * C)
    G = num_groups
    Cg = C // G
    _check_layout(x, channels_last, "x")
    _check_layout(dy, channels_last, "dy")
    dx = torch.empty_like(x)
    dwp = torch.empty((N, C), device=x.device, dtype=torch.float32)
    dbp = torch.empty((N, C), device=x.device, dtype=torch.float32)
    dadd = torch.empty((N, C), device=x.device, dtype=add.dtype) if add is not None else None
    block_c, block_l, one_tile = block_sizes(Cg, L, max_tile, max_block_c)
    _gn_silu_bwd_kernel[(N * G,)](
        dy, x, add if add is not None else x, weight, bias, mean, rstd,
        dx, dwp, dbp, dadd if dadd is not None else dwp,
        C, L, Cg, G,
        HAS_ADD=add is not None, ACT=bool(act), CHANNELS_LAST=bool(channels_last), ONE_TILE=one_tile,
        BLOCK_C=block_c, BLOCK_L=block_l, num_warps=_num_warps(block_c, block_l), enable_fp_fusion=True,
    )
    dweight = dwp.sum(0).to(weight.dtype)
    dbias = dbp.sum(0).to(bias.dtype)
    return dx, dweight, dbias, dadd
