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
variable CBDM_FAST_CHECKS=1 is set. Without it, an out-of-range t on the Triton path gives NaN for that
sample (the kernel never reads out of bounds); the reference raises a device-side assert.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["q_sample", "q_sample_reference"]

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRUE = ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- shared helpers
# (also used by cbdm_fast/ops/cb_loss.py)

def checks_enabled() -> bool:
    """CBDM_FAST_CHECKS=1: also run host-syncing value checks on CUDA tensors."""
    return os.environ.get("CBDM_FAST_CHECKS", "").strip().lower() in _TRUE


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_blocker(op: str, device: torch.device, dtype: torch.dtype):
    """None when the Triton kernels can run on ``device`` with ``dtype``, else (exception type, message)."""
    if dtype not in TRITON_DTYPES:
        return TypeError, f"{op}: the Triton kernels need float32, float16 or bfloat16 inputs, got {dtype}"
    if not _HAS_TRITON:
        return RuntimeError, f"{op}: backend='triton' but triton is not installed"
    if device.type == "cpu":
        if not _interpreting():
            return RuntimeError, (f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set "
                                  f"TRITON_INTERPRET=1 before importing triton")
    elif device.type != "cuda":
        return ValueError, f"{op}: the Triton kernels do not support device {device}"
    return None


def batch_outer_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill one dense block of memory with the batch dimension outermost, so
    that sample b is the memory range [b*N, (b+1)*N) from x's first element (N = numel // B).
    Contiguous and channels_last tensors and batch slices of them (out[:B], out[B:]) qualify."""
    if x.dim() == 0:
        return False
    if x.numel() == 0:
        return True
    inner = sorted((x.stride(i), x.size(i)) for i in range(1, x.dim()) if x.size(i) != 1)
    expected = 1
    for stride, size in inner:
        if stride != expected:
            return False
        expected *= size
    return x.size(0) == 1 or x.stride(0) == expected


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1 (same memory order)."""
    return a.shape == b.shape and all(a.stride(i) == b.stride(i) for i in range(a.dim()) if a.size(i) != 1)


def dense_batch_outer(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is batch-outer dense, else a contiguous copy (differentiable)."""
    return x if batch_outer_dense(x) else x.contiguous()


def match_layout(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x in ref's memory layout (ref must be batch-outer dense): x itself when it already is, else a
    differentiable copy."""
    if same_layout(x, ref):
        return x
    if ref.is_contiguous():
        return x.contiguous()
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def check_t(op: str, t, B: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: t must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: t must be an int64 tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{op}: t must be 1-D with one timestep per sample (shape ({B},)), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: t is on {t.device} but the inputs are on {device}; "
                         f"all tensors must be on the same device")


def check_t_range(op: str, t: torch.Tensor, T: int) -> None:
    """t in [0, T): always on CPU, on CUDA only with CBDM_FAST_CHECKS=1 (a sync); never while compiling."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    if t.device.type == "cpu" or (t.device.type != "meta" and checks_enabled()):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"{op}: t must be in [0, T) = [0, {T}), got a timestep {lo if lo < 0 else hi}")


def check_images(op: str, named, ref_name: str) -> torch.Tensor:
    """Same type/dtype/shape/device checks for a list of (name, tensor); returns the first tensor."""
    for name, v in named:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(v).__name__}")
    ref = named[0][1]
    if not ref.is_floating_point():
        raise TypeError(f"{op}: {ref_name} must have a floating dtype, got {ref.dtype}")
    if ref.dim() < 1:
        raise ValueError(f"{op}: {ref_name} must have a batch dimension, got a 0-d tensor")
    for name, v in named[1:]:
        if v.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {v.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
        if v.shape != ref.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(v.shape)} but {ref_name} has shape "
                             f"{tuple(ref.shape)}; they must match")
        if v.device != ref.device:
            raise ValueError(f"{op}: {name} is on {v.device} but {ref_name} is on {ref.device}; "
                             f"all tensors must be on the same device")
    return ref


# ----------------------------------------------------------------------------- validation

def _validate(x_0, t, noise, sqrt_ab, sqrt_1m_ab) -> int:
    """Checks every argument (TypeError for a wrong type or dtype, ValueError for a wrong shape, device
    or value, each naming the argument); returns T."""
    op = "q_sample"
    check_images(op, [("x_0", x_0), ("noise", noise)], "x_0")
    check_t(op, t, x_0.shape[0], x_0.device)
    for name, tab in (("sqrt_ab", sqrt_ab), ("sqrt_1m_ab", sqrt_1m_ab)):
        if not isinstance(tab, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tab).__name__}")
        if tab.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be a float64 or float32 table, got dtype {tab.dtype}")
        if tab.dim() != 1 or tab.shape[0] < 1:
            raise ValueError(f"{op}: {name} must be a 1-D table of length T >= 1, got shape {tuple(tab.shape)}")
        if tab.device != x_0.device:
            raise ValueError(f"{op}: {name} is on {tab.device} but x_0 is on {x_0.device}; "
                             f"all tensors must be on the same device")
    if sqrt_1m_ab.shape[0] != sqrt_ab.shape[0]:
        raise ValueError(f"{op}: sqrt_1m_ab has length {sqrt_1m_ab.shape[0]} but sqrt_ab has length "
                         f"{sqrt_ab.shape[0]}; both tables must have length T")
    T = sqrt_ab.shape[0]
    check_t_range(op, t, T)
    return T


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
    from cbdm_fast.kernels import q_sample as K  # imported lazily: triton reads TRITON_INTERPRET at import
    return K


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
    if backend not in BACKENDS:
        raise ValueError(f"q_sample: backend must be one of {BACKENDS}, got {backend!r}")
    _validate(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    if backend == "reference":
        return _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    blocker = triton_blocker("q_sample", x_0.device, x_0.dtype)
    if blocker is not None:
        if backend == "triton":
            raise blocker[0](blocker[1])
        return _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    if x_0.numel() == 0:
        return _reference(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    x_0 = dense_batch_outer(x_0)
    noise = match_layout(noise, x_0)
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.q_sample(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
    return _EagerFn.apply(x_0, t, noise, sqrt_ab, sqrt_1m_ab)
