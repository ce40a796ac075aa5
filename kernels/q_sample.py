"""Fused forward process of DDPM with the schedule-table gather:

    x_t[b, i]      = a_b * x_0[b, i] + s_b * noise[b, i],   a_b = f32(sqrt_ab[t_b]),  s_b = f32(sqrt_1m_ab[t_b])
    backward:  dx_0[b, i] = a_b * g[b, i],   dnoise[b, i] = s_b * g[b, i]

Coefficients are gathered from the (T,) float64 or float32 tables and rounded to float32, exactly like
``cbdm_fast.schedule.extract``; all math is float32 and the products are NOT contracted into an fma
(``enable_fp_fusion=False``), so for float32 inputs x_t is bit-identical to ``Schedule.q_sample``.

Layout: every (B, ...) tensor handed to these launchers must be "batch-outer dense" -- sample b occupies
the memory range [b*N, (b+1)*N) counted from the tensor's first element, N = numel // B -- and all of
them must share that layout (contiguous NCHW, channels_last and batch slices of either qualify; the op
layer in cbdm_fast/ops/q_sample.py guarantees it). The kernels then run over memory linearly, so
channels_last needs no special case.

Grid: one program per (sample, block of BLOCK elements of that sample), flattened into one axis
(pid = b * nblk + j; a 1-D grid has no 65535 limit). A block never straddles two samples, so each
program loads t_b and the two coefficients ONCE as scalars instead of gathering per element.
The price is a partly masked last block per sample when N is not a multiple of BLOCK (N = 3*32*32 =
3072 is a multiple of 1024, so none at the training shapes).

A t_b outside [0, T) never reads out of bounds: that sample's coefficients become NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import block_for, manual_bf16, store_cast

NUM_WARPS = 4


@triton.jit
def _sample_block(t_ptr, a_ptr, s_ptr, N, T, nblk, BLOCK: tl.constexpr):
    """This program's block (pid = b * nblk + j): sample b's coefficients (a_b, s_b) as float32 scalars,
    NaN when t_b is out of [0, T); the sample's first element (int64); the block's offsets and mask."""
    pid = tl.program_id(0)
    b = pid // nblk
    j = pid - b * nblk
    tb = tl.load(t_ptr + b)
    ok = (tb >= 0) & (tb < T)
    ti = tl.where(ok, tb, 0)
    a = tl.load(a_ptr + ti).to(tl.float32)
    s = tl.load(s_ptr + ti).to(tl.float32)
    nan = float("nan")
    offs = j * BLOCK + tl.arange(0, BLOCK)
    return tl.where(ok, a, nan), tl.where(ok, s, nan), b.to(tl.int64) * N, offs, offs < N


@triton.jit
def _q_sample_fwd_kernel(
    x_ptr,    # (B, N) x_0, float32/float16/bfloat16, batch-outer dense
    n_ptr,    # (B, N) noise, same dtype and layout as x_0
    t_ptr,    # (B,) int64 timesteps
    a_ptr,    # (T,) float64 or float32: sqrt(alphas_bar)
    s_ptr,    # (T,) float64 or float32: sqrt(1 - alphas_bar)
    out_ptr,  # (B, N) x_t, x_0's dtype and layout
    N, T, nblk,
    BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    a, s, base, offs, mask = _sample_block(t_ptr, a_ptr, s_ptr, N, T, nblk, BLOCK)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * x + s * n
    store_cast(out_ptr + base + offs, y, mask, MANUAL_BF16)


@triton.jit
def _q_sample_bwd_kernel(
    g_ptr,    # (B, N) upstream gradient of x_t, batch-outer dense
    t_ptr,    # (B,) int64
    a_ptr,    # (T,) float64/float32 sqrt(alphas_bar)
    s_ptr,    # (T,) float64/float32 sqrt(1 - alphas_bar)
    dx_ptr,   # (B, N) gradient of x_0 (g's dtype and layout); unused unless WRITE_DX
    dn_ptr,   # (B, N) gradient of noise; unused unless WRITE_DN
    N, T, nblk,
    WRITE_DX: tl.constexpr, WRITE_DN: tl.constexpr, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    a, s, base, offs, mask = _sample_block(t_ptr, a_ptr, s_ptr, N, T, nblk, BLOCK)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_DX:
        store_cast(dx_ptr + base + offs, a * g, mask, MANUAL_BF16)
    if WRITE_DN:
        store_cast(dn_ptr + base + offs, s * g, mask, MANUAL_BF16)


def q_sample_fwd(x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_ab: torch.Tensor,
                 sqrt_1m_ab: torch.Tensor, out: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """Writes x_t into ``out``. x_0, noise, out: (B, ...) of one batch-outer-dense layout; t: (B,) int64
    contiguous; tables: (T,) contiguous."""
    B = x_0.shape[0]
    if x_0.numel() == 0:
        return out
    N = x_0.numel() // B
    BLOCK = block_for(N, block)
    nblk = triton.cdiv(N, BLOCK)
    _q_sample_fwd_kernel[(B * nblk,)](
        x_0, noise, t, sqrt_ab, sqrt_1m_ab, out, N, sqrt_ab.shape[0], nblk,
        BLOCK=BLOCK, MANUAL_BF16=manual_bf16(out.dtype), num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def q_sample_bwd(grad: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor,
                 dx: Optional[torch.Tensor], dn: Optional[torch.Tensor], block: Optional[int] = None) -> None:
    """Writes dx = a_b * grad and dn = s_b * grad (each only when given) in grad's layout."""
    if dx is None and dn is None or grad.numel() == 0:
        return
    B = grad.shape[0]
    N = grad.numel() // B
    BLOCK = block_for(N, block)
    nblk = triton.cdiv(N, BLOCK)
    out_dtype = (dx if dx is not None else dn).dtype
    _q_sample_bwd_kernel[(B * nblk,)](
        grad, t, sqrt_ab, sqrt_1m_ab, dx if dx is not None else grad, dn if dn is not None else grad,
        N, sqrt_ab.shape[0], nblk,
        WRITE_DX=dx is not None, WRITE_DN=dn is not None, BLOCK=BLOCK,
        MANUAL_BF16=manual_bf16(out_dtype), num_warps=NUM_WARPS, enable_fp_fusion=False)
