"""The CBDM training loss from the network outputs, fused: both terms and both gradients in one pass.

Exactly the semantics of ``cbdm_fast.losses.cbdm_terms`` (SPEC.md, Training, steps 3-4):

    loss_ddpm = mean((h - noise)^2)
    w_b       = tau * t_b / T * keep_b                                   (keep: default all ones)
    loss_reg  = mean(w (h - sg(h_bal))^2 + 1/4 w (sg(h) - h_bal)^2)       (sg = stop-gradient)
    dh        = g1 * 2 (h - noise) / M + g2 * 2 w (h - h_bal) / M
    dh_bal    = g2 * 1/4 * 2 w (h_bal - h) / M                           (noise, t, keep: no gradient)

with g1, g2 the upstream gradients of the two scalars and M = h.numel(). h_bal=None gives loss_reg = 0
(plain DDPM / CFG). ``keep`` switches the regulariser off without a host branch -- one value, or one
per sample: keep = 0 gives loss_reg = 0 and dh_bal = 0 exactly, keep = 1 all of it (a value between
scales w). A Python number must be in [0, 1] (it becomes a 0-d device tensor, made by a fill that a
CUDA graph can capture). A tensor must hold values in [0, 1], normally 0 or 1; reading them needs a
host sync, so they are checked where t's range is (below), never inside a CUDA graph capture.
Both losses are float32 scalars; float16 and bfloat16 inputs are accumulated in float32 and the
gradients come back in the inputs' dtype.

Batched CBDM: h = out[:B] and h_bal = out[B:] (halves of the network's output on a 2B batch) are used
without copies; their gradients flow back into ``out`` through the slicing.

Backends: ``"triton"`` (kernels/cb_loss.py: a forward kernel writes deterministic per-block partial sums
and, when h or h_bal requires grad, the float32 gradient directions 2(h-noise)/M and 2w(h-h_bal)/M; a
one-program kernel reduces the partials; the backward is one elementwise kernel that scales them by the
upstream gradients read from device memory -- see that file for the traffic trade-off; in eager mode an
autograd.Function calls them directly, avoiding the custom op's dispatch overhead), ``"reference"``
(pure torch: ``cb_loss_reference``) and ``"auto"`` (Triton on CUDA tensors, and on CPU tensors when
TRITON_INTERPRET=1; else the reference). The Triton path is the custom op ``torch.ops.cbdm_fast.cb_loss``
with fake and autograd registrations, so ``torch.compile(fullgraph=True)`` sees no graph break.

Range check of t (in [0, T)) and keep's values: CPU tensors always (not while torch.compile traces),
CUDA tensors only with CBDM_FAST_CHECKS=1 (it needs a sync), never inside a CUDA graph capture. t is
only used as a number here, so a bad t cannot fault.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from ._common import (TRITON_BACKENDS, check_backend, check_device, check_images, check_int, check_real, check_t,
                      check_t_range, dense_batch_outer, kernel_module, match_layout, use_triton, value_checks_run)

__all__ = ["cb_loss", "cb_loss_reference"]

BACKENDS = TRITON_BACKENDS
_OP = "cb_loss"


def _validate(h, h_bal, noise, t, T, tau, keep):
    """Checks every argument: TypeError for a wrong type or dtype, ValueError for a wrong shape, device
    or value; each names the argument. Returns (T, tau, keep) with keep None or a tensor on h's device."""
    check_images(_OP, [("h", h), ("noise", noise), ("h_bal", h_bal)], optional=("h_bal",))
    B = h.shape[0]
    check_t(_OP, t, B, h.device)
    T = check_int(_OP, "T", T)
    if T <= 0:
        raise ValueError(f"{_OP}: T must be > 0, got {T}")
    tau = check_real(_OP, "tau", tau, 0.0)
    keep = _check_keep(keep, B, h)
    check_t_range(_OP, t, T)
    return T, tau, keep


def _check_keep(keep, B, h):
    if keep is None:
        return None
    if isinstance(keep, numbers.Real):  # a bool too: True keeps the regulariser, False drops it
        value = check_real(_OP, "keep", float(keep), 0.0, 1.0, hint=" (0: no regulariser, 1: all of it)")
        return torch.full((), value, dtype=torch.float32, device=h.device)
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"{_OP}: keep must be None, a number in [0, 1] or a tensor, got {type(keep).__name__}")
    if not (keep.is_floating_point() or keep.dtype == torch.bool):
        raise TypeError(f"{_OP}: keep must be a float (or bool) 0/1 tensor, got dtype {keep.dtype}")
    if keep.shape not in (torch.Size([]), torch.Size([B])):
        raise ValueError(f"{_OP}: keep must be a scalar or have shape ({B},) (one 0/1 value per sample), "
                         f"got shape {tuple(keep.shape)}")
    check_device(_OP, "keep", keep, "h", h)
    if keep.dtype != torch.bool and keep.numel() > 0 and value_checks_run(keep):
        bad = ~((keep >= 0) & (keep <= 1))  # NaN is bad too
        if bool(bad.any()):
            raise ValueError(f"{_OP}: keep must hold values in [0, 1] (0 or 1: the regulariser off or on), "
                             f"got {float(keep[bad].reshape(-1)[0])}")
    return keep


# ----------------------------------------------------------------------------- reference

def _reference(h, h_bal, noise, t, T, tau, keep):
    """The operations of cbdm_terms, for any rank; low-precision inputs are upcast to float32 first."""
    if h.dtype in (torch.float16, torch.bfloat16):
        h, noise = h.float(), noise.float()
        h_bal = h_bal.float() if h_bal is not None else None
    loss_ddpm = torch.nn.functional.mse_loss(h, noise, reduction="none").mean()
    if h_bal is None:
        return loss_ddpm, torch.zeros((), device=h.device, dtype=loss_ddpm.dtype)
    shape = [h.shape[0]] + [1] * (h.dim() - 1)
    w = t.view(shape) / T * tau
    if keep is not None:
        w = w * keep.to(w.dtype).view([-1] + [1] * (h.dim() - 1))
    loss_adjust = w * torch.nn.functional.mse_loss(h, h_bal.detach(), reduction="none")
    loss_commit = w * torch.nn.functional.mse_loss(h.detach(), h_bal, reduction="none")
    return loss_ddpm, (loss_adjust + 1 / 4 * loss_commit).mean()


def cb_loss_reference(h: torch.Tensor, h_bal: Optional[torch.Tensor], noise: torch.Tensor, t: torch.Tensor,
                      T: int, tau: float, keep: Union[None, float, torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch; for float32 (B, C, H, W) inputs the same operations as ``cbdm_terms`` (equal results)."""
    T, tau, keep = _validate(h, h_bal, noise, t, T, tau, keep)
    return _reference(h, h_bal, noise, t, T, tau, keep)


# ----------------------------------------------------------------------------- custom ops (Triton)

def _kernels():
    return kernel_module("cb_loss")


def _fwd_buffers(h, has_bal, need_grad):
    loss_ddpm = torch.empty((), dtype=torch.float32, device=h.device)
    loss_reg = torch.empty((), dtype=torch.float32, device=h.device)
    ga = torch.empty_like(h, dtype=torch.float32) if need_grad else h.new_empty(0, dtype=torch.float32)
    gb = (torch.empty_like(h, dtype=torch.float32) if need_grad and has_bal
          else h.new_empty(0, dtype=torch.float32))
    return loss_ddpm, loss_reg, ga, gb


@torch.library.custom_op("cbdm_fast::cb_loss", mutates_args=())
def _cb_loss_op(h: torch.Tensor, h_bal: Optional[torch.Tensor], noise: torch.Tensor, t: torch.Tensor,
                keep: Optional[torch.Tensor], T: int, tau: float, need_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # h batch-outer dense; h_bal and noise in h's layout; keep None or float32 (guaranteed by cb_loss).
    # Returns (loss_ddpm, loss_reg, ga, gb); ga, gb are the saved gradient directions (empty unless need_grad).
    return _fwd_impl(h, h_bal, noise, t, keep, T, tau, need_grad)


def _fwd_impl(h, h_bal, noise, t, keep, T, tau, need_grad):
    loss_ddpm, loss_reg, ga, gb = _fwd_buffers(h, h_bal is not None, need_grad)
    _kernels().cb_loss_fwd(h, h_bal, noise, t.contiguous(), None if keep is None else keep.contiguous(), T, tau,
                           loss_ddpm, loss_reg, ga if need_grad else None,
                           gb if (need_grad and h_bal is not None) else None)
    return loss_ddpm, loss_reg, ga, gb


@_cb_loss_op.register_fake
def _(h, h_bal, noise, t, keep, T, tau, need_grad):
    return _fwd_buffers(h, h_bal is not None, need_grad)


def _bwd_buffers(ga, dtype, need_h, need_hbal):
    dh = torch.empty_like(ga, dtype=dtype) if need_h else ga.new_empty(0, dtype=dtype)
    dhb = torch.empty_like(ga, dtype=dtype) if need_hbal else ga.new_empty(0, dtype=dtype)
    return dh, dhb


@torch.library.custom_op("cbdm_fast::cb_loss_backward", mutates_args=())
def _cb_loss_backward_op(ga: torch.Tensor, gb: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype,
                         need_h: bool, need_hbal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # gb is empty when there was no h_bal (then need_hbal is False)
    return _bwd_impl(ga, gb, g1, g2, dtype, need_h, need_hbal)


def _bwd_impl(ga, gb, g1, g2, dtype, need_h, need_hbal):
    dh, dhb = _bwd_buffers(ga, dtype, need_h, need_hbal)
    _kernels().cb_loss_bwd(ga, gb if gb.numel() else None, g1.float().contiguous(), g2.float().contiguous(),
                           dh if need_h else None, dhb if need_hbal else None)
    return dh, dhb


@_cb_loss_backward_op.register_fake
def _(ga, gb, g1, g2, dtype, need_h, need_hbal):
    return _bwd_buffers(ga, dtype, need_h, need_hbal)


def _setup_context(ctx, inputs, output):
    h, h_bal, _, _, _, _, _, need_grad = inputs
    _, _, ga, gb = output
    ctx.save_for_backward(ga, gb)
    ctx.dtype = h.dtype
    ctx.has_bal = h_bal is not None
    ctx.need_grad = need_grad


def _upstream(g1, g2, ga):
    """The two upstream gradients as float32 device scalars (zeros for a loss that got none)."""
    if g1 is None or g2 is None:
        zero = torch.zeros((), dtype=torch.float32, device=ga.device)
        g1 = zero if g1 is None else g1
        g2 = zero if g2 is None else g2
    return g1, g2


def _backward(ctx, g1, g2, _ga_grad, _gb_grad):
    need_h = ctx.needs_input_grad[0]
    need_hbal = ctx.has_bal and ctx.needs_input_grad[1]
    if not (need_h or need_hbal):
        return (None,) * 8
    if not ctx.need_grad:
        raise RuntimeError("cbdm_fast::cb_loss was called with need_grad=False; its inputs get no gradient")
    ga, gb = ctx.saved_tensors
    g1, g2 = _upstream(g1, g2, ga)
    dh, dhb = torch.ops.cbdm_fast.cb_loss_backward(ga, gb, g1, g2, ctx.dtype, need_h, need_hbal)
    return (dh if need_h else None), (dhb if need_hbal else None), None, None, None, None, None, None


_cb_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFn(torch.autograd.Function):
    """The eager-mode path of the Triton backend: the custom ops' bodies called directly, without the
    tens of microseconds of Python dispatch a torch.library custom op costs per call (forward and
    backward). cb_loss uses the custom op only while torch.compile traces. Same kernels, same results."""

    @staticmethod
    def forward(ctx, h, h_bal, noise, t, keep, T, tau, need_grad):
        loss_ddpm, loss_reg, ga, gb = _fwd_impl(h, h_bal, noise, t, keep, T, tau, need_grad)
        ctx.set_materialize_grads(False)
        if need_grad:
            ctx.save_for_backward(ga, gb)
        ctx.dtype = h.dtype
        ctx.has_bal = h_bal is not None
        ctx.need_grad = need_grad
        return loss_ddpm, loss_reg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g1, g2):
        need_h = ctx.needs_input_grad[0]
        need_hbal = ctx.has_bal and ctx.needs_input_grad[1]
        if not (need_h or need_hbal) or (g1 is None and g2 is None):
            return (None,) * 8
        ga, gb = ctx.saved_tensors
        g1, g2 = _upstream(g1, g2, ga)
        dh, dhb = _bwd_impl(ga, gb, g1, g2, ctx.dtype, need_h, need_hbal)
        return (dh if need_h else None), (dhb if need_hbal else None), None, None, None, None, None, None


# ----------------------------------------------------------------------------- public op

def cb_loss(h: torch.Tensor, h_bal: Optional[torch.Tensor], noise: torch.Tensor, t: torch.Tensor, T: int,
            tau: float, keep: Union[None, float, torch.Tensor] = None, backend: str = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_ddpm, loss_reg) of CBDM from the network outputs; differentiable in h and h_bal.

    h, h_bal, noise: (B, ...) of one floating dtype, shape and device (any layout; h_bal may be None).
    t: (B,) int64 in [0, T). T: int > 0. tau: finite real >= 0. keep: None, a number in [0, 1], or a
    float/bool tensor of shape () or (B,) on the same device holding 0 or 1 (values in [0, 1]),
    multiplying w per sample (see the module docstring for when a tensor's values are checked).
    Returns two float32 scalars.
    backend: "auto", "triton" (raises RuntimeError where it cannot run, TypeError for a dtype other
    than float32, float16, bfloat16) or "reference" (see the module docstring).
    Errors: TypeError for a wrong type or dtype, ValueError for a wrong shape, device or value, each
    naming the argument.
    """
    check_backend(_OP, backend, BACKENDS)
    T, tau, keep = _validate(h, h_bal, noise, t, T, tau, keep)
    if not use_triton(_OP, h, backend, "h") or h.numel() == 0:  # empty: mean of nothing is NaN, as torch
        return _reference(h, h_bal, noise, t, T, tau, keep)
    h = dense_batch_outer(h)
    noise = match_layout(noise, h)
    if h_bal is not None:
        h_bal = match_layout(h_bal, h)
    if keep is not None and keep.dtype != torch.float32:
        keep = keep.to(torch.float32)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or (h_bal is not None and h_bal.requires_grad))
    if torch.compiler.is_compiling():  # the custom op: no graph break
        loss_ddpm, loss_reg, _, _ = torch.ops.cbdm_fast.cb_loss(h, h_bal, noise, t, keep, T, tau, need_grad)
        return loss_ddpm, loss_reg
    return _EagerFn.apply(h, h_bal, noise, t, keep, T, tau, need_grad)
