"""The forward process of DDPM with the schedule-table gather fused in:

    x_t = sqrt_ab[t] * x_0 + sqrt_1m_ab[t] * noise          (per sample b: coefficients a_b, s_b)
    backward: dx_0 = sqrt_ab[t] * g,  dnoise = sqrt_1m_ab[t] * g   (t and the tables get no gradient)

The coefficients are gathered from the (T,) float64 or float32 tables and cast to float32 exactly like
``cbdm_fast.schedule.extract``; all math is float32 whatever the I/O dtype, and the result has x_0's
dtype. For float32 inputs the result is bit-identical to ``Schedule.q_sample`` on every backend.

Backends: ``"triton"`` (kernels/q_sample.py; runs on CUDA tensors, and on CPU tensors through the
Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported), ``"reference"`` (pure
torch, ``q_sample_reference``) and ``"auto"`` (Triton where it can run, else the reference). The Triton
path is the custom op ``torch.ops.cbdm_fast.q_sample`` (with fake and autograd registrations) while
torch.compile traces, so ``torch.compile(fullgraph=True)`` sees no graph break; in eager mode an
autograd.Function calls the same kernels directly (no custom-op dispatch overhead).

Layouts: any. The kernels want a "batch-outer dense" tensor (contiguous, channels_last, or a batch slice
of either) and x_0 and noise in the same layout; other inputs are copied into that form first (noise
into x_0's layout). x_t has x_0's layout.

Range check of t: it needs a device sync, so it runs for CPU tensors always (except while
torch.compile traces, where it would be a graph break) and for CUDA tensors only when the environment
variable CBDM_FAST_CHECKS=1 is set (never inside a CUDA graph capture). Without it, an out-of-range t
on the Triton path gives NaN for that sample (the kernel never reads out of bounds); the reference
raises a device-side assert.
"""
from __future__ import annotations

import torch

from ._common import (TRITON_BACKENDS, check_backend, check_device, check_images, check_t, check_t_range,
                      check_tensor, dense_batch_outer, kernel_module, match_layout, use_triton)

__all__ = ["q_sample", "q_sample_reference"]

BACKENDS = TRITON_BACKENDS
_OP = "q_sample"


# ----------------------------------------------------------------------------- validation

def _validate(x_0, t, noise, sqrt_ab, sqrt_1m_ab) -> None:
    """Checks every argument (TypeError for a wrong type or dtype, ValueError for a wrong shape, device
    or value, each naming the argument)."""
    check_images(_OP, [("x_0", x_0), ("noise", noise)])
    check_t(_OP, t, x_0.shape[0], x_0.device)
    for name, tab in (("sqrt_ab", sqrt_ab), ("sqrt_1m_ab", sqrt_1m_ab)):
        check_tensor(_OP, name, tab)
        if tab.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{_OP}: {name} must be a float64 or float32 table, got dtype {tab.dtype}")
        if tab.dim() != 1 or tab.shape[0] < 1:
            raise ValueError(f"{_OP}: {name} must be a 1-D table of length T >= 1, got shape {tuple(tab.shape)}")
        check_device(_OP, name, tab, "x_0", x_0)
    if sqrt_1m_ab.shape[0] != sqrt_ab.shape[0]:
        raise ValueError(f"{_OP}: sqrt_1m_ab has length {sqrt_1m_ab.shape[0]} but sqrt_ab has length "
                         f"{sqrt_ab.shape[0]}; both tables must have length T")
    check_t_range(_OP, t, sqrt_ab.shape[0])


# ----------------------------------------------------------------------------- reference

def _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab):
    shape = [x_0.shape[0]] + [1] * (x_0.dim() - 1)
    a = torch.gather(sqrt_ab, 0, t).float().view(shape)     # = schedule.extract
    s = torch.gather(sqrt_1m_ab, 0, t).float().view(shape)
    return (a * x_0 + s * noise).to(x_0.dtype)


def q_sample_reference(x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_ab: torch.Tensor,
                       sqrt_1m_ab: torch.Tensor) -> torch.Tensor:
    """Pure torch, the operations of ``Schedule.q_sample`` (equal to it bit for bit for float32);
    low-precision inputs are computed in float32 and rounded once to x_0's dtype."""
    _validate(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    return _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab)


# ----------------------------------------------------------------------------- custom ops (Triton)

def _kernels():
    return kernel_module("q_sample")


def _fwd_impl(x_0, t, noise, sqrt_ab, sqrt_1m_ab):
    out = torch.empty_like(x_0)
    _kernels().q_sample_fwd(x_0, t.contiguous(), noise, sqrt_ab.contiguous(), sqrt_1m_ab.contiguous(), out)
    return out


@torch.library.custom_op("cbdm_fast::q_sample", mutates_args=())
def _q_sample_op(x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_ab: torch.Tensor,
                 sqrt_1m_ab: torch.Tensor) -> torch.Tensor:
    # x_0 batch-outer dense, noise in x_0's layout (guaranteed by q_sample)
    return _fwd_impl(x_0, t, noise, sqrt_ab, sqrt_1m_ab)


@_q_sample_op.register_fake
def _(x_0, t, noise, sqrt_ab, sqrt_1m_ab):
    return torch.empty_like(x_0)


def _bwd_buffers(grad, need_x0, need_noise):
    grad = dense_batch_outer(grad)
    dx = torch.empty_like(grad) if need_x0 else grad.new_empty(0)
    dn = torch.empty_like(grad) if need_noise else grad.new_empty(0)
    return grad, dx, dn


@torch.library.custom_op("cbdm_fast::q_sample_backward", mutates_args=())
def _q_sample_backward_op(grad: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor,
                          need_x0: bool, need_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, t, sqrt_ab, sqrt_1m_ab, need_x0, need_noise)


def _bwd_impl(grad, t, sqrt_ab, sqrt_1m_ab, need_x0, need_noise):
    grad, dx, dn = _bwd_buffers(grad, need_x0, need_noise)
    _kernels().q_sample_bwd(grad, t.contiguous(), sqrt_ab.contiguous(), sqrt_1m_ab.contiguous(),
                            dx if need_x0 else None, dn if need_noise else None)
    return dx, dn


@_q_sample_backward_op.register_fake
def _(grad, t, sqrt_ab, sqrt_1m_ab, need_x0, need_noise):
    _, dx, dn = _bwd_buffers(grad, need_x0, need_noise)
    return dx, dn


def _setup_context(ctx, inputs, output):
    _, t, _, sqrt_ab, sqrt_1m_ab = inputs
    ctx.save_for_backward(t, sqrt_ab, sqrt_1m_ab)


def _backward(ctx, grad):
    t, sqrt_ab, sqrt_1m_ab = ctx.saved_tensors
    need_x0, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x0 or need_noise):
        return None, None, None, None, None
    dx, dn = torch.ops.cbdm_fast.q_sample_backward(grad, t, sqrt_ab, sqrt_1m_ab, need_x0, need_noise)
    return (dx if need_x0 else None), None, (dn if need_noise else None), None, None


_q_sample_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFn(torch.autograd.Function):
    """The eager-mode path of the Triton backend: the custom ops' bodies called directly, without the
    Python dispatch overhead of a torch.library custom op; q_sample uses the custom op only while
    torch.compile traces. Same kernels, same results."""

    @staticmethod
    def forward(ctx, x_0, t, noise, sqrt_ab, sqrt_1m_ab):
        ctx.save_for_backward(t, sqrt_ab, sqrt_1m_ab)
        return _fwd_impl(x_0, t, noise, sqrt_ab, sqrt_1m_ab)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        t, sqrt_ab, sqrt_1m_ab = ctx.saved_tensors
        need_x0, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_x0 or need_noise):
            return None, None, None, None, None
        dx, dn = _bwd_impl(grad, t, sqrt_ab, sqrt_1m_ab, need_x0, need_noise)
        return (dx if need_x0 else None), None, (dn if need_noise else None), None, None


# ----------------------------------------------------------------------------- public op

def q_sample(x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_ab: torch.Tensor,
             sqrt_1m_ab: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x_t = sqrt_ab[t] * x_0 + sqrt_1m_ab[t] * noise, differentiable in x_0 and noise.

    x_0, noise: (B, ...) of one floating dtype, shape and device (any layout). t: (B,) int64 in [0, T).
    sqrt_ab, sqrt_1m_ab: (T,) float64 or float32 tables (``Schedule.sqrt_alphas_bar`` and
    ``Schedule.sqrt_one_minus_alphas_bar``). Returns x_t with x_0's dtype, shape and layout.
    backend: "auto" (Triton where it can run -- see the module docstring -- else the reference),
    "triton" (raises RuntimeError where it cannot run, TypeError for a dtype other than float32,
    float16, bfloat16) or "reference".
    Errors: TypeError for a wrong type or dtype, ValueError for a wrong shape, length, device or
    value, each naming the argument.
    """
    check_backend(_OP, backend, BACKENDS)
    _validate(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    if not use_triton(_OP, x_0, backend, "x_0") or x_0.numel() == 0:
        return _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    x_0 = dense_batch_outer(x_0)
    noise = match_layout(noise, x_0)
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.q_sample(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    return _EagerFn.apply(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
