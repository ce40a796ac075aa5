"""One guided DDPM ancestral step (the CBDM authors' sampler), batched with a per-sample timestep.

Per sample b with timestep t_b, all math in float32 whatever the I/O dtype:

    eps    = eps_c + omega * (eps_c - eps_u)          # classifier-free guidance; eps = eps_c if eps_u is None
    x0     = sqrt_recip_ab[t] * x_t - sqrt_recipm1_ab[t] * eps
    x0     = clamp(x0, -1, 1)                         # only if clip_x0 (the authors' code does not clip)
    mean   = coef1[t] * x0 + coef2[t] * x_t           # posterior mean of q(x_{t-1} | x_t, x0)
    x_prev = mean + sigma[t] * noise  if t > 0  else  mean

``table`` is the (5, T) float32 tensor ``Schedule.sampling_table(var_type)`` with rows
[sqrt_recip_ab, sqrt_recipm1_ab, coef1, coef2, sigma].

Backends: the C++ extension (CPU: float32; CUDA: float32 / float16 / bfloat16, launched on the
current stream, no host sync, so it can be captured in a CUDA graph) and the pure-torch reference
``ddpm_step_reference``. The extension's CPU path is bit-identical to the reference (same operation
order, no fma contraction). While torch.compile traces, the extension is reached through the custom
op ``torch.ops.cbdm_fast.ddpm_step`` (with a fake implementation), so ``torch.compile(fullgraph=True)``
over a sampling step sees no graph break; in eager mode the launch is called directly (no custom-op
dispatch overhead; the same results).

Range check of t: a host-side check needs a device sync, so it runs for CPU tensors always and for
CUDA tensors only when the environment variable ``CBDM_FAST_CHECKS=1`` is set (never inside a CUDA
graph capture or while torch.compile traces). Without it, a bad t on CUDA gives NaN for that sample
in the extension (the kernel never reads out of bounds) and a device-side assert in the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._common import (EXTENSION_BACKENDS, check_backend, check_device, check_images, check_real, check_t,
                      check_t_range, check_tensor, clipped, combine_guided, fast_path)

__all__ = ["ddpm_step", "ddpm_step_reference"]

BACKENDS = EXTENSION_BACKENDS
_OP = "ddpm_step"


def _validate(x_t, eps_c, eps_u, t, noise, table, omega) -> float:
    """Checks every argument; returns omega as a float. Raises TypeError (wrong type or dtype) or
    ValueError (shape, device, layout or value), naming the argument."""
    check_images(_OP, [("x_t", x_t), ("eps_c", eps_c), ("eps_u", eps_u), ("noise", noise)], optional=("eps_u",))
    check_t(_OP, t, x_t.shape[0], x_t.device)
    check_tensor(_OP, "table", table)
    if table.dtype != torch.float32:
        raise TypeError(f"{_OP}: table must be float32, got dtype {table.dtype}")
    if table.dim() != 2 or table.shape[0] != 5 or table.shape[1] < 1:
        raise ValueError(f"{_OP}: table must have shape (5, T) with T >= 1 (rows sqrt_recip_ab, "
                         f"sqrt_recipm1_ab, coef1, coef2, sigma), got shape {tuple(table.shape)}")
    if not table.is_contiguous():
        raise ValueError(f"{_OP}: table must be contiguous (call .contiguous())")
    check_device(_OP, "table", table, "x_t", x_t)
    omega = check_real(_OP, "omega", omega, hint=" (the guidance strength)")
    check_t_range(_OP, t, table.shape[1])
    return omega


def ddpm_step_reference(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
                        noise: torch.Tensor, table: torch.Tensor, omega: float = 0.0,
                        clip_x0: bool = False) -> torch.Tensor:
    """The pure-torch step, in float32, in the authors' order of operations (see the module docstring).
    Accepts any layout and any floating dtype (computed in float32, returned in x_t's dtype)."""
    omega = _validate(x_t, eps_c, eps_u, t, noise, table, omega)
    return _reference(x_t, eps_c, eps_u, t, noise, table, omega, bool(clip_x0))


def _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0):
    shape = (x_t.shape[0],) + (1,) * (x_t.dim() - 1)
    coefs = table[:, t]  # (5, B)
    sqrt_recip_ab, sqrt_recipm1_ab, coef1, coef2, sigma = (c.view(shape) for c in coefs.unbind(0))
    x = x_t.float()
    eps = combine_guided(eps_c, eps_u, omega)
    x0 = clipped(sqrt_recip_ab * x - sqrt_recipm1_ab * eps, clip_x0)
    mean = coef1 * x0 + coef2 * x
    x_prev = torch.where((t > 0).view(shape), mean + sigma * noise.float(), mean)  # no noise at t = 0
    return x_prev.to(x_t.dtype)


def _extension_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0):
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    t = t.contiguous()
    B = x_t.shape[0]
    pointers = (out.data_ptr(), x_t.data_ptr(), eps_c.data_ptr(), 0 if eps_u is None else eps_u.data_ptr(),
                t.data_ptr(), noise.data_ptr(), table.data_ptr())
    _extension.launch(_OP, x_t, pointers, (B, x_t.numel() // B, table.shape[1], omega, clip_x0))
    return out


@torch.library.custom_op("cbdm_fast::ddpm_step", mutates_args=())
def _ddpm_step_op(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
                  noise: torch.Tensor, table: torch.Tensor, omega: float, clip_x0: bool) -> torch.Tensor:
    # inputs contiguous, no autograd, the extension loaded (guaranteed by ddpm_step)
    return _extension_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)


@_ddpm_step_op.register_fake
def _(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def ddpm_step(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
              noise: torch.Tensor, table: torch.Tensor, omega: float = 0.0, clip_x0: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """One guided ancestral step x_t -> x_{t-1}; returns a new tensor of x_t's dtype and shape.

    x_t, eps_c, eps_u, noise: (B, ...) same shape, dtype and device; eps_u=None means no guidance.
    t: (B,) int64 in [0, T). table: (5, T) float32 contiguous (``Schedule.sampling_table``).
    omega: finite guidance strength (ignored when eps_u is None). clip_x0: clamp x0 to [-1, 1].
    backend: "auto" (the extension when it is loaded and supports the device, dtype and layout,
    else the reference), "extension" (raises when it cannot run: RuntimeError if it is not available,
    ValueError for non-contiguous inputs -- they are rejected, not copied -- TypeError for a dtype it
    does not support), or "reference".
    Errors: TypeError for a wrong type/dtype, ValueError for a wrong shape, device or value (a NaN or
    infinite omega included); each message names the argument. See the module docstring for when t's
    range is checked.
    """
    check_backend(_OP, backend, BACKENDS)
    omega = _validate(x_t, eps_c, eps_u, t, noise, table, omega)
    clip_x0 = bool(clip_x0)
    if backend == "reference" or x_t.numel() == 0:
        return _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
    named = (("x_t", x_t), ("eps_c", eps_c), ("eps_u", eps_u), ("noise", noise))
    if not fast_path(backend, "extension", _extension.blocker(_OP, x_t, named)):
        return _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.ddpm_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
    return _extension_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
