"""Fused CBDM loss: both loss terms and both input gradients in one pass over (h, h_bal, noise).

    w_b       = tau * t_b / T * keep_b                               (float32, like losses.regulariser_weight)
    loss_ddpm = (1/M) sum_{b,i} (h - noise)^2
    loss_reg  = (1/M) sum_{b,i} (w_b (h - sg(h_bal))^2 + 1/4 w_b (sg(h) - h_bal)^2)
              = (5/4) (1/M) sum_b w_b sum_i (h - h_bal)^2            (M = numel of h)
    dh        = g1 * ga + g2 * gb,   dh_bal = -1/4 * g2 * gb,   with
    ga        = 2 (h - noise) / M,   gb = 2 w_b (h - h_bal) / M      (g1, g2: upstream grads of the two losses)

Design (chosen for minimal traffic per training step, and no host sync):
1. ``_cb_loss_fwd_kernel``: one program per (sample, block of that sample) -- a block never straddles two
   samples, so w_b is one scalar per program. It reads h, h_bal, noise once (any float dtype, math in
   float32), writes the program's two partial sums (sum (h-noise)^2 and w_b * sum (h-h_bal)^2) to its own
   slot of a small float32 buffer and, when gradients are needed (WRITE_GRAD), writes ga and gb in
   float32. Those two are everything the backward needs for ANY pair (g1, g2), so the backward never
   re-reads h, h_bal or noise.
2. ``_cb_loss_finalize_kernel``: ONE program sums the partials in a fixed order (deterministic two-stage
   reduction, no atomics) and writes the two float32 scalars.
3. ``_cb_loss_bwd_kernel`` (in backward): reads ga, gb and the two upstream scalars (device pointers, so
   no sync), writes dh and dh_bal in the inputs' dtype. A cheap scale.
Traffic per element for bf16 inputs: forward 3x2 B read + 2x4 B written, backward 2x4 B read + 2x2 B
written (26 B); recomputing in backward instead would be 3x2 + 3x2 + 2x2 = 16 B but keeps h, h_bal and
noise alive for the backward and passes over three tensors twice. The loss tensors are tiny next to
the UNet's activations (batch 128 at 32x32: 0.4 M elements), so the one-pass design (ARCHITECTURE.md)
costs ~1 us per training step more than the minimum on an H200.
ga and gb stay float32 so that a later scale by (g1, g2) rounds once into bf16/fp16.

keep = 0 for a sample gives w_b = 0, hence exactly zero for its loss_reg share and its dh_bal.
t_b is only used as a number (no gather), so an out-of-range t cannot fault here.
Layout: h, h_bal, noise, ga, gb share one batch-outer-dense layout (see kernels/q_sample.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import FMA, block_for, manual_bf16, store_cast

NUM_WARPS = 4
FINAL_BLOCK = 1024
BWD_BLOCK = 1024


@triton.jit
def _cb_loss_fwd_kernel(
    h_ptr,      # (B, N) h (eps for the true label), float32/float16/bfloat16, batch-outer dense
    hb_ptr,     # (B, N) h_bal (eps for the re-sampled label), same dtype and layout; unused unless HAS_BAL
    n_ptr,      # (B, N) noise, same dtype and layout
    t_ptr,      # (B,) int64 timesteps
    keep_ptr,   # (B,) float32, or one float32 (keep_stride = 0); unused unless HAS_KEEP
    part_ptr,   # (B * nblk, 2) float32 partials: [sum (h-noise)^2, w_b * sum (h-h_bal)^2]
    ga_ptr,     # (B, N) float32 out: 2 (h - noise) / M;        unused unless WRITE_GRAD
    gb_ptr,     # (B, N) float32 out: 2 w_b (h - h_bal) / M;    unused unless WRITE_GRAD and HAS_BAL
    N, nblk, keep_stride,
    T_f, tau, grad_scale,   # float32 scalars: T, tau, 2 / M
    HAS_BAL: tl.constexpr, HAS_KEEP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // nblk
    j = pid - b * nblk
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    h = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    d1 = h - n
    tl.store(part_ptr + 2 * pid, tl.sum(d1 * d1, axis=0))
    if WRITE_GRAD:
        tl.store(ga_ptr + base + offs, d1 * grad_scale, mask=mask)
    if HAS_BAL:
        # w_b = (t_b / T) * tau [* keep_b]: the order of cbdm_fast.losses, IEEE division
        w = tl.div_rn(tl.load(t_ptr + b).to(tl.float32), T_f) * tau
        if HAS_KEEP:
            w = w * tl.load(keep_ptr + b * keep_stride)
        hb = tl.load(hb_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d2 = h - hb
        tl.store(part_ptr + 2 * pid + 1, w * tl.sum(d2 * d2, axis=0))
        if WRITE_GRAD:
            tl.store(gb_ptr + base + offs, (w * grad_scale) * d2, mask=mask)
    else:
        tl.store(part_ptr + 2 * pid + 1, 0.0)


@triton.jit
def _cb_loss_finalize_kernel(
    part_ptr,   # (P, 2) float32 partials from _cb_loss_fwd_kernel
    ddpm_ptr,   # () float32 out: loss_ddpm
    reg_ptr,    # () float32 out: loss_reg
    P, M_f,     # number of partials; M as float32
    BLOCK: tl.constexpr,
):
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < P
        acc1 += tl.load(part_ptr + 2 * offs, mask=m, other=0.0)
        acc2 += tl.load(part_ptr + 2 * offs + 1, mask=m, other=0.0)
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    tl.store(ddpm_ptr, tl.div_rn(s1, M_f))
    tl.store(reg_ptr, tl.div_rn(1.25 * s2, M_f))


@triton.jit
def _cb_loss_bwd_kernel(
    ga_ptr,     # (numel,) float32: 2 (h - noise) / M, dense in h's layout
    gb_ptr,     # (numel,) float32: 2 w (h - h_bal) / M; unused unless HAS_GB
    g1_ptr,     # () float32 upstream gradient of loss_ddpm
    g2_ptr,     # () float32 upstream gradient of loss_reg; unused unless HAS_GB
    dh_ptr,     # (numel,) out, h's dtype: g1 ga + g2 gb;  unused unless WRITE_DH
    dhb_ptr,    # (numel,) out, h_bal's dtype: -g2 gb / 4; unused unless WRITE_DHB
    numel,
    HAS_GB: tl.constexpr, WRITE_DH: tl.constexpr, WRITE_DHB: tl.constexpr,
    BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if HAS_GB:
        g2 = tl.load(g2_ptr).to(tl.float32)
        gb = tl.load(gb_ptr + offs, mask=mask, other=0.0)
        if WRITE_DH:
            g1 = tl.load(g1_ptr).to(tl.float32)
            ga = tl.load(ga_ptr + offs, mask=mask, other=0.0)
            store_cast(dh_ptr + offs, g1 * ga + g2 * gb, mask, MANUAL_BF16)
        if WRITE_DHB:
            store_cast(dhb_ptr + offs, (-0.25 * g2) * gb, mask, MANUAL_BF16)
    else:
        if WRITE_DH:
            g1 = tl.load(g1_ptr).to(tl.float32)
            ga = tl.load(ga_ptr + offs, mask=mask, other=0.0)
            store_cast(dh_ptr + offs, g1 * ga, mask, MANUAL_BF16)


def cb_loss_fwd(h: torch.Tensor, h_bal: Optional[torch.Tensor], noise: torch.Tensor, t: torch.Tensor,
                keep: Optional[torch.Tensor], T: int, tau: float, loss_ddpm: torch.Tensor, loss_reg: torch.Tensor,
                ga: Optional[torch.Tensor], gb: Optional[torch.Tensor], block: Optional[int] = None) -> None:
    """Writes the two loss scalars and, when ``ga`` (and ``gb``) are given, the scaled gradient
    directions. h, h_bal, noise, ga, gb: (B, ...) in one batch-outer-dense layout; t: (B,) int64
    contiguous; keep: None, or a contiguous float32 tensor with 1 or B elements."""
    B = h.shape[0]
    M = h.numel()
    N = M // B
    BLOCK = block_for(N, block)
    nblk = triton.cdiv(N, BLOCK)
    P = B * nblk
    partials = torch.empty((P, 2), dtype=torch.float32, device=h.device)
    write_grad = ga is not None
    has_bal = h_bal is not None
    _cb_loss_fwd_kernel[(P,)](
        h, h_bal if has_bal else h, noise, t, keep if keep is not None else t, partials,
        ga if write_grad else partials, gb if (write_grad and has_bal) else partials,
        N, nblk, 0 if keep is None or keep.numel() == 1 else 1,
        float(T), float(tau), 2.0 / M,
        HAS_BAL=has_bal, HAS_KEEP=keep is not None, WRITE_GRAD=write_grad, BLOCK=BLOCK, num_warps=NUM_WARPS, **FMA)
    _cb_loss_finalize_kernel[(1,)](
        partials, loss_ddpm, loss_reg, P, float(M),
        BLOCK=max(16, min(FINAL_BLOCK, triton.next_power_of_2(P))), num_warps=NUM_WARPS, **FMA)


def cb_loss_bwd(ga: torch.Tensor, gb: Optional[torch.Tensor], g1: torch.Tensor, g2: torch.Tensor,
                dh: Optional[torch.Tensor], dhb: Optional[torch.Tensor]) -> None:
    """dh = g1 ga + g2 gb and dh_bal = -g2 gb / 4 (each only when given), elementwise over the dense
    storage of ga (dh, dhb, gb share its strides). g1, g2: float32 scalars on the device."""
    numel = ga.numel()
    if numel == 0 or (dh is None and dhb is None):
        return
    has_gb = gb is not None
    out = dh if dh is not None else dhb
    _cb_loss_bwd_kernel[(triton.cdiv(numel, BWD_BLOCK),)](
        ga, gb if has_gb else ga, g1, g2, dh if dh is not None else out, dhb if dhb is not None else out, numel,
        HAS_GB=has_gb, WRITE_DH=dh is not None, WRITE_DHB=(dhb is not None and has_gb),
        BLOCK=BWD_BLOCK, MANUAL_BF16=manual_bf16(out.dtype), num_warps=NUM_WARPS, **FMA)
