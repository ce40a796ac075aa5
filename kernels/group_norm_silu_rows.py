"""(x + add) -> GroupNorm -> affine -> SiLU for channels-last tensors, "rows" strategy: every tile is
whole memory rows (all C channels of BLOCK_L positions), and the group statistics are reduced across
tiles by a second small kernel. The math is the one in kernels/group_norm_silu.py's docstring:

    u = x + add[n, c];  mean, rstd per (n, group) over Cg * L elements;  xhat = (u - mean) * rstd
    z = xhat * weight[c] + bias[c];  y = z * sigmoid(z) if ACT else z
    backward, s = sigmoid(z):  dz = dy * s * (1 + z * (1 - s)) if ACT else dy
    du = rstd * (dz * w - c1 - xhat * c2),  c1 = mean_g(dz * w),  c2 = mean_g(dz * w * xhat)

Why a second strategy: in channels-last memory one group's channels are only Cg * itemsize bytes of
each row (8-16 bytes for the UNet's 32 groups in bf16), so the one-kernel "groups" strategy, which
keeps a whole group in one program, reads narrow row slices and reached 33-42% of the copy bandwidth on
an H200 (bench/RESULTS.md). Here a tile of BLOCK_L x C reads 256-512 contiguous bytes per row; the price
is a split reduction: the statistics of a group are spread over S = cdiv(L, BLOCK_L) tiles, so

  forward   1. stats:     per (n, tile, channel): the tile's channel mean and M2 (two-pass in registers)
            2. finalize:  per (n, group): Chan et al.'s parallel combination of those partials -> mean, rstd
            3. apply:     per (n, tile): normalise, affine, SiLU; x is read a second time (from L2 when the
                          tensor fits in it: 25 MB at 96x128x32x32 bf16, against 50-60 MB of L2)
  backward  1. stats:     per (n, tile, channel): sum dz, sum dz * xhat, sum xhat
            2. finalize:  per (n, group): per-sample channel sums (the dweight / dbias partials), c1, c2,
                          and dadd[n, c] = sum_l du = rstd * (w_c * S_dz - L * c1 - c2 * S_xhat) in closed form
            3. apply:     per (n, tile): dx

Every reduction runs in a fixed order (no atomics), so results are deterministic. The caller
(kernels/group_norm_silu.py's launchers) sums the per-sample dweight / dbias partials over N.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FMA

__all__ = ["rows_fwd", "rows_bwd", "rows_config", "sizes", "ROWS_TILE", "MAX_ROWS_BLOCK_C"]

ROWS_TILE = 8192         # elements of one [BLOCK_L, BLOCK_C] tile (registers of one program)
MAX_ROWS_BLOCK_C = 512   # channels of one tile; wider tensors take several channel blocks


@triton.jit
def _tile(x_ptr, add_ptr, C, L, S, HAS_ADD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: program (n * S + s, k) covers positions [s * BLOCK_L, (s + 1) * BLOCK_L) and
    channels [k * BLOCK_C, (k + 1) * BLOCK_C) of sample n. Returns n, s, the sample's first element
    (int64), the offsets within the sample, mask, channel indices, channel mask and u = x + add (fp32, 0
    where masked)."""
    pid = tl.program_id(0)
    n = pid // S
    s = pid % S
    base = n.to(tl.int64) * L * C
    ll = s * BLOCK_L + tl.arange(0, BLOCK_L)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    mask = (ll < L)[:, None] & cmask[None, :]
    off = ll[:, None] * C + cc[None, :]
    u = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + n * C + cc, mask=cmask, other=0.0).to(tl.float32)
        u = tl.where(mask, u + a[None, :], 0.0)
    return n, s, base, off, mask, cc, cmask, u


@triton.jit
def _fwd_stats_kernel(
    x_ptr,      # (N, L, C) channels-last input (element (n, l, c) at n*L*C + l*C + c)
    add_ptr,    # (N, C) add, x's dtype; unused unless HAS_ADD
    part_ptr,   # (2, N, S, C) fp32 out: [mean of the tile's rows, M2 about it] per channel
    N, C, L, S,
    HAS_ADD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, base, off, mask, cc, cmask, u = _tile(x_ptr, add_ptr, C, L, S, HAS_ADD, BLOCK_L, BLOCK_C)
    count = tl.minimum(L - s * BLOCK_L, BLOCK_L).to(tl.float32)
    mean = tl.sum(u, axis=0) / count
    d = tl.where(mask, u - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    out = (n * S + s) * C + cc
    tl.store(part_ptr + out, mean, mask=cmask)
    tl.store(part_ptr + N * S * C + out, m2, mask=cmask)


@triton.jit
def _group_channels(Cg, G, CG_P2: tl.constexpr):
    """The finalize kernels' program pid = n * G + g: pid, n, group g's channel indices and their mask."""
    pid = tl.program_id(0)
    n = pid // G
    j = tl.arange(0, CG_P2)
    return pid, n, (pid % G) * Cg + j, j < Cg


@triton.jit
def _fwd_finalize_kernel(
    part_ptr,   # (2, N, S, C) fp32 from _fwd_stats_kernel
    mean_ptr,   # (N, G) fp32 out
    rstd_ptr,   # (N, G) fp32 out
    N, C, L, S, Cg, G, BLOCK_L, M, eps,   # M = Cg * L as a float
    BLOCK_S: tl.constexpr, CG_P2: tl.constexpr,
):
    """One program per (n, g): mean = sum_s,c count_s * mean_sc / M, then
    M2 = sum_s,c (M2_sc + count_s * (mean_sc - mean)^2)  (Chan et al.)."""
    pid, n, c, cmask = _group_channels(Cg, G, CG_P2)
    acc = tl.zeros([BLOCK_S, CG_P2], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < S)[:, None] & cmask[None, :]
        cnt = tl.minimum(L - ss * BLOCK_L, BLOCK_L).to(tl.float32)
        mu = tl.load(part_ptr + (n * S + ss)[:, None] * C + c[None, :], mask=m, other=0.0)
        acc += tl.where(m, cnt[:, None] * mu, 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / M
    acc = tl.zeros([BLOCK_S, CG_P2], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < S)[:, None] & cmask[None, :]
        cnt = tl.minimum(L - ss * BLOCK_L, BLOCK_L).to(tl.float32)
        off = (n * S + ss)[:, None] * C + c[None, :]
        mu = tl.load(part_ptr + off, mask=m, other=0.0)
        m2 = tl.load(part_ptr + N * S * C + off, mask=m, other=0.0)
        dm = mu - mean
        acc += tl.where(m, m2 + cnt[:, None] * dm * dm, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / M
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt_rn(var + eps))


@triton.jit
def _group_stats(mean_ptr, rstd_ptr, n, cc, cmask, Cg, G):
    """mean and rstd of each channel's group, gathered per channel: two (BLOCK_C,) fp32 vectors."""
    gi = n * G + cc // Cg
    return (tl.load(mean_ptr + gi, mask=cmask, other=0.0), tl.load(rstd_ptr + gi, mask=cmask, other=0.0))


@triton.jit
def _fwd_apply_kernel(
    x_ptr, add_ptr,   # as in _fwd_stats_kernel
    w_ptr, b_ptr,     # (C,) weight, bias (x's dtype or fp32)
    mean_ptr, rstd_ptr,  # (N, G) fp32
    y_ptr,            # (N, L, C) out, x's dtype
    C, L, S, Cg, G,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, base, off, mask, cc, cmask, u = _tile(x_ptr, add_ptr, C, L, S, HAS_ADD, BLOCK_L, BLOCK_C)
    mean, rstd = _group_stats(mean_ptr, rstd_ptr, n, cc, cmask, Cg, G)
    w = tl.load(w_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    z = (u - mean[None, :]) * (rstd * w)[None, :] + b[None, :]
    if ACT:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + base + off, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, L, S, Cg, G,
              HAS_ADD: tl.constexpr, ACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's backward tile: _tile's n, s, base, offsets, mask, channels and channel mask, then
    xhat, dz, w and rstd per channel, fp32, xhat and dz 0 where masked."""
    n, s, base, off, mask, cc, cmask, u = _tile(x_ptr, add_ptr, C, L, S, HAS_ADD, BLOCK_L, BLOCK_C)
    mean, rstd = _group_stats(mean_ptr, rstd_ptr, n, cc, cmask, Cg, G)
    w = tl.load(w_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (u - mean[None, :]) * rstd[None, :], 0.0)
    dz = tl.load(dy_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        b = tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
        z = xhat * w[None, :] + b[None, :]
        sg = tl.sigmoid(z)
        dz = dz * sg * (1.0 + z * (1.0 - sg))
    return n, s, base, off, mask, cc, cmask, xhat, dz, w, rstd


@triton.jit
def _bwd_stats_kernel(
    dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,   # as in the forward; dy like x
    part_ptr,   # (3, N, S, C) fp32 out: the tile's sums of dz, dz * xhat and xhat per channel
    N, C, L, S, Cg, G,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, base, off, mask, cc, cmask, xhat, dz, w, rstd = _bwd_tile(x_ptr, dy_ptr, add_ptr, w_ptr, b_ptr, mean_ptr,
                                                                    rstd_ptr, C, L, S, Cg, G, HAS_ADD, ACT,
                                                                    BLOCK_L, BLOCK_C)
    out = (n * S + s) * C + cc
    tl.store(part_ptr + out, tl.sum(dz, axis=0), mask=cmask)
    tl.store(part_ptr + N * S * C + out, tl.sum(dz * xhat, axis=0), mask=cmask)
    tl.store(part_ptr + 2 * N * S * C + out, tl.sum(xhat, axis=0), mask=cmask)


@triton.jit
def _bwd_finalize_kernel(
    part_ptr,   # (3, N, S, C) fp32 from _bwd_stats_kernel
    w_ptr,      # (C,) weight
    rstd_ptr,   # (N, G) fp32
    coef_ptr,   # (2, N, G) fp32 out: c1 = mean_g(dz * w), c2 = mean_g(dz * w * xhat)
    sums_ptr,   # (2, N, C) fp32 out: per-sample [sum_l dz * xhat (dweight), sum_l dz (dbias)]
    dadd_ptr,   # (N, C) out, add's dtype: sum_l du; unused unless HAS_ADD
    N, C, L, S, Cg, G, inv_m, Lf,   # inv_m = 1 / (Cg * L), Lf = L, as floats
    HAS_ADD: tl.constexpr, BLOCK_S: tl.constexpr, CG_P2: tl.constexpr,
):
    pid, n, c, cmask = _group_channels(Cg, G, CG_P2)
    a_dz = tl.zeros([BLOCK_S, CG_P2], dtype=tl.float32)
    a_dzx = tl.zeros([BLOCK_S, CG_P2], dtype=tl.float32)
    a_x = tl.zeros([BLOCK_S, CG_P2], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < S)[:, None] & cmask[None, :]
        off = (n * S + ss)[:, None] * C + c[None, :]
        a_dz += tl.load(part_ptr + off, mask=m, other=0.0)
        a_dzx += tl.load(part_ptr + N * S * C + off, mask=m, other=0.0)
        a_x += tl.load(part_ptr + 2 * N * S * C + off, mask=m, other=0.0)
    s_dz = tl.sum(a_dz, axis=0)
    s_dzx = tl.sum(a_dzx, axis=0)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    c1 = tl.sum(w * s_dz, axis=0) * inv_m
    c2 = tl.sum(w * s_dzx, axis=0) * inv_m
    tl.store(coef_ptr + pid, c1)
    tl.store(coef_ptr + N * G + pid, c2)
    tl.store(sums_ptr + n * C + c, s_dzx, mask=cmask)
    tl.store(sums_ptr + N * C + n * C + c, s_dz, mask=cmask)
    if HAS_ADD:
        rstd = tl.load(rstd_ptr + pid)
        dadd = rstd * (w * s_dz - Lf * c1 - c2 * tl.sum(a_x, axis=0))
        tl.store(dadd_ptr + n * C + c, dadd.to(dadd_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_apply_kernel(
    dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    coef_ptr,   # (2, N, G) fp32 from _bwd_finalize_kernel
    dx_ptr,     # (N, L, C) out, x's dtype
    N, C, L, S, Cg, G,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, base, off, mask, cc, cmask, xhat, dz, w, rstd = _bwd_tile(x_ptr, dy_ptr, add_ptr, w_ptr, b_ptr, mean_ptr,
                                                                    rstd_ptr, C, L, S, Cg, G, HAS_ADD, ACT,
                                                                    BLOCK_L, BLOCK_C)
    gi = n * G + cc // Cg
    c1 = tl.load(coef_ptr + gi, mask=cmask, other=0.0)
    c2 = tl.load(coef_ptr + N * G + gi, mask=cmask, other=0.0)
    du = rstd[None, :] * (dz * w[None, :] - c1[None, :] - xhat * c2[None, :])
    tl.store(dx_ptr + base + off, du.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host launchers


def rows_config(C: int, L: int, tile: int = None, max_block_c: int = None):
    """(BLOCK_L, BLOCK_C, S, channel blocks, num_warps) of a launch: tiles of whole rows (BLOCK_C >= C up
    to max_block_c channels), BLOCK_L positions so that the tile holds about ``tile`` elements."""
    tile = ROWS_TILE if tile is None else tile
    block_c = min(triton.next_power_of_2(C), MAX_ROWS_BLOCK_C if max_block_c is None else max_block_c)
    block_l = max(1, min(triton.next_power_of_2(L), tile // block_c))
    elems = block_l * block_c
    num_warps = 1 if elems <= 256 else 2 if elems <= 1024 else 4 if elems <= 4096 else 8
    return block_l, block_c, triton.cdiv(L, block_l), triton.cdiv(C, block_c), num_warps


def sizes(x: torch.Tensor, num_groups: int):
    """N, C, L (positions per sample), G and Cg (channels per group) of x (N, C, *spatial)."""
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // max(1, N * C), num_groups, C // num_groups


def _finalize_sizes(S: int, Cg: int):
    return min(triton.next_power_of_2(S), 64), triton.next_power_of_2(Cg)


def rows_fwd(x: torch.Tensor, weight, bias, add, num_groups: int, eps: float, act: bool, *, tile=None,
             max_block_c=None):
    """Forward of a channels-last-contiguous x (N, C, *spatial); three launches. Returns (y like x,
    mean (N, G) fp32, rstd (N, G) fp32)."""
    N, C, L, G, Cg = sizes(x, num_groups)
    block_l, block_c, S, cb, warps = rows_config(C, L, tile, max_block_c)
    y = torch.empty_like(x)
    part = torch.empty((2, N, S, C), device=x.device, dtype=torch.float32)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    has_add = add is not None
    a = add if has_add else x
    _fwd_stats_kernel[(N * S, cb)](x, a, part, N, C, L, S, HAS_ADD=has_add, BLOCK_L=block_l, BLOCK_C=block_c,
                                   num_warps=warps, **FMA)
    block_s, cg_p2 = _finalize_sizes(S, Cg)
    _fwd_finalize_kernel[(N * G,)](part, mean, rstd, N, C, L, S, Cg, G, block_l, float(Cg * L), float(eps),
                                   BLOCK_S=block_s, CG_P2=cg_p2, num_warps=1, **FMA)
    _fwd_apply_kernel[(N * S, cb)](x, a, weight, bias, mean, rstd, y, C, L, S, Cg, G, HAS_ADD=has_add,
                                   ACT=bool(act), BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps, **FMA)
    return y, mean, rstd


def rows_bwd(dy: torch.Tensor, x: torch.Tensor, weight, bias, add, mean, rstd, num_groups: int, act: bool, *,
             tile=None, max_block_c=None):
    """Backward of rows_fwd; three launches. dy has x's (channels-last) layout. Returns (dx like x,
    per-sample partials (2, N, C) fp32 [sum_l dz * xhat, sum_l dz] for the caller to sum over N,
    dadd (N, C) add's dtype or None)."""
    N, C, L, G, Cg = sizes(x, num_groups)
    block_l, block_c, S, cb, warps = rows_config(C, L, tile, max_block_c)
    dx = torch.empty_like(x)
    part = torch.empty((3, N, S, C), device=x.device, dtype=torch.float32)
    coef = torch.empty((2, N, G), device=x.device, dtype=torch.float32)
    sums = torch.empty((2, N, C), device=x.device, dtype=torch.float32)
    has_add = add is not None
    dadd = torch.empty((N, C), device=x.device, dtype=add.dtype) if has_add else None
    a = add if has_add else x
    _bwd_stats_kernel[(N * S, cb)](dy, x, a, weight, bias, mean, rstd, part, N, C, L, S, Cg, G, HAS_ADD=has_add,
                                   ACT=bool(act), BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps, **FMA)
    block_s, cg_p2 = _finalize_sizes(S, Cg)
    _bwd_finalize_kernel[(N * G,)](part, weight, rstd, coef, sums, dadd if has_add else sums, N, C, L, S, Cg, G,
                                   1.0 / (Cg * L), float(L), HAS_ADD=has_add, BLOCK_S=block_s, CG_P2=cg_p2,
                                   num_warps=1, **FMA)
    _bwd_apply_kernel[(N * S, cb)](dy, x, a, weight, bias, mean, rstd, coef, dx, N, C, L, S, Cg, G,
                                   HAS_ADD=has_add, ACT=bool(act), BLOCK_L=block_l, BLOCK_C=block_c,
                                   num_warps=warps, **FMA)
    return dx, sums, dadd
