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
current stream, no host sync) and the pure-torch reference ``ddpm_step_reference``. The extension's
CPU path is bit-identical to the reference (same operation order, no fma contraction).

Range check of t: a host-side check needs a device sync, so it runs for CPU tensors always and for
CUDA tensors only when the environment variable ``CBDM_FAST_CHECKS=1`` is set. Without it, a bad t
on CUDA gives NaN for that sample in the extension (the kernel never reads out of bounds) and a
device-side assert in the reference.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional

import torch

from . import _extension

__all__ = ["ddpm_step", "ddpm_step_reference"]

BACKENDS = ("auto", "extension", "reference")


def _checks_enabled() -> bool:
    return os.environ.get("CBDM_FAST_CHECKS", "").strip().lower() in ("1", "true", "yes", "on")


def _validate(x_t, eps_c, eps_u, t, noise, table, omega) -> int:
    """Checks every argument; returns T. Raises TypeError (wrong type or dtype) or ValueError
    (shape, device, layout or value), naming the argument."""
    for name, v in (("x_t", x_t), ("eps_c", eps_c), ("t", t), ("noise", noise), ("table", table)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"ddpm_step: {name} must be a torch.Tensor, got {type(v).__name__}")
    if eps_u is not None and not isinstance(eps_u, torch.Tensor):
        raise TypeError(f"ddpm_step: eps_u must be a torch.Tensor or None, got {type(eps_u).__name__}")
    if isinstance(omega, bool) or not isinstance(omega, numbers.Real):
        raise TypeError(f"ddpm_step: omega must be a real number, got {type(omega).__name__}")

    if not x_t.is_floating_point():
        raise TypeError(f"ddpm_step: x_t must have a floating dtype, got {x_t.dtype}")
    if x_t.dim() < 1:
        raise ValueError("ddpm_step: x_t must have a batch dimension, got a 0-d tensor")
    others = [("eps_c", eps_c), ("noise", noise)] + ([("eps_u", eps_u)] if eps_u is not None else [])
    for name, v in others:
        if v.dtype != x_t.dtype:
            raise TypeError(f"ddpm_step: {name} has dtype {v.dtype} but x_t has dtype {x_t.dtype}; they must match")
        if v.shape != x_t.shape:
            raise ValueError(f"ddpm_step: {name} has shape {tuple(v.shape)} but x_t has shape "
                             f"{tuple(x_t.shape)}; they must match")

    if t.dtype != torch.int64:
        raise TypeError(f"ddpm_step: t must be an int64 tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"ddpm_step: t must be 1-D with one timestep per sample (shape ({x_t.shape[0]},)), "
                         f"got shape {tuple(t.shape)}")

    if table.dtype != torch.float32:
        raise TypeError(f"ddpm_step: table must be float32, got dtype {table.dtype}")
    if table.dim() != 2 or table.shape[0] != 5 or table.shape[1] < 1:
        raise ValueError(f"ddpm_step: table must have shape (5, T) with T >= 1 (rows sqrt_recip_ab, "
                         f"sqrt_recipm1_ab, coef1, coef2, sigma), got shape {tuple(table.shape)}")
    if not table.is_contiguous():
        raise ValueError("ddpm_step: table must be contiguous (call .contiguous())")
    T = table.shape[1]

    for name, v in others + [("t", t), ("table", table)]:
        if v.device != x_t.device:
            raise ValueError(f"ddpm_step: {name} is on {v.device} but x_t is on {x_t.device}; "
                             f"all tensors must be on the same device")

    if t.numel() > 0 and (t.device.type == "cpu" or (t.device.type != "meta" and _checks_enabled())):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= T:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ddpm_step: t must be in [0, T) = [0, {T}), got a timestep {bad}")
    return T


def ddpm_step_reference(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
                        noise: torch.Tensor, table: torch.Tensor, omega: float = 0.0,
                        clip_x0: bool = False) -> torch.Tensor:
    """The pure-torch step, in float32, in the authors' order of operations (see the module docstring).
    Accepts any layout and any floating dtype (computed in float32, returned in x_t's dtype)."""
    _validate(x_t, eps_c, eps_u, t, noise, table, omega)
    return _reference(x_t, eps_c, eps_u, t, noise, table, float(omega), bool(clip_x0))


def _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0):
    shape = (x_t.shape[0],) + (1,) * (x_t.dim() - 1)
    coefs = table[:, t]  # (5, B)
    sqrt_recip_ab, sqrt_recipm1_ab, coef1, coef2, sigma = (c.view(shape) for c in coefs.unbind(0))
    x = x_t.float()
    e_c = eps_c.float()
    eps = e_c + omega * (e_c - eps_u.float()) if eps_u is not None else e_c
    x0 = sqrt_recip_ab * x - sqrt_recipm1_ab * eps
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = coef1 * x0 + coef2 * x
    x_prev = torch.where((t > 0).view(shape), mean + sigma * noise.float(), mean)  # no noise at t = 0
    return x_prev.to(x_t.dtype)


def _extension_blocker(x_t, eps_c, eps_u, t, noise):
    """None when the extension can run these inputs, else (exception type, message)."""
    named = (("x_t", x_t), ("eps_c", eps_c), ("eps_u", eps_u), ("noise", noise))
    return _extension.blocker("ddpm_step", x_t, named)


def _extension_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0, T):
    mod = _extension.load()
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    t = t.contiguous()
    B = x_t.shape[0]
    N = x_t.numel() // B
    ptrs = (out.data_ptr(), x_t.data_ptr(), eps_c.data_ptr(), 0 if eps_u is None else eps_u.data_ptr(),
            t.data_ptr(), noise.data_ptr(), table.data_ptr())
    if x_t.device.type == "cpu":
        mod.ddpm_step_cpu(*ptrs, B, N, T, omega, clip_x0, 0)
    else:
        device, stream = _extension.cuda_target(x_t)
        mod.ddpm_step_cuda(*ptrs, B, N, T, omega, clip_x0, _extension.dtype_code(x_t.dtype), device, stream)
    return out


def ddpm_step(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
              noise: torch.Tensor, table: torch.Tensor, omega: float = 0.0, clip_x0: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """One guided ancestral step x_t -> x_{t-1}; returns a new tensor of x_t's dtype and shape.

    x_t, eps_c, eps_u, noise: (B, ...) same shape, dtype and device; eps_u=None means no guidance.
    t: (B,) int64 in [0, T). table: (5, T) float32 contiguous (``Schedule.sampling_table``).
    omega: guidance strength (ignored when eps_u is None). clip_x0: clamp x0 to [-1, 1].
    backend: "auto" (the extension when it is loaded and supports the device, dtype and layout,
    else the reference), "extension" (raises when it cannot run: RuntimeError if it is not available,
    ValueError for non-contiguous inputs -- they are rejected, not copied -- TypeError for a dtype it
    does not support), or "reference".
    Errors: TypeError for a wrong type/dtype, ValueError for a wrong shape, device or value; each
    message names the argument. See the module docstring for when t's range is checked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"ddpm_step: backend must be one of {BACKENDS}, got {backend!r}")
    T = _validate(x_t, eps_c, eps_u, t, noise, table, omega)
    omega, clip_x0 = float(omega), bool(clip_x0)
    if backend == "reference" or x_t.numel() == 0:
        return _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
    blocker = _extension_blocker(x_t, eps_c, eps_u, t, noise)
    if blocker is None:
        return _extension_step(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0, T)
    if backend == "extension":
        exc, msg = blocker
        raise exc(msg)
    return _reference(x_t, eps_c, eps_u, t, noise, table, omega, clip_x0)
