"""One guided DDIM step (Song et al. 2021), batched with a per-sample pair of timesteps.

From timestep t_b to the previous timestep s_b = t_prev[b] of a sub-sequence (s_b = -1: the final
step to x_0). Per-sample coefficients, in float64 from the float32 table, then rounded to float32:

    ab_t  = alphas_bar[t];  ab_s = alphas_bar[s] if s >= 0 else 1
    sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(max(1 - ab_t / ab_s, 0))
    c_dir = sqrt(max((1 - ab_s) - sigma**2, 0))

and elementwise, in float32 whatever the I/O dtype:

    eps    = eps_c + omega * (eps_c - eps_u)        # classifier-free guidance; eps = eps_c if eps_u is None
    x0     = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
    x0     = clamp(x0, -1, 1)                       # only if clip_x0
    x_prev = sqrt(ab_s) * x0 + c_dir * eps + sigma * noise   # the noise term only where sigma > 0

The ``max(., 0)`` only absorbs rounding (both are >= 0 in exact arithmetic for 0 <= eta <= 1).
eta = 0 is deterministic DDIM (noise is ignored and may be None); eta = 1 with t_prev = t - 1 is
DDPM's ancestral step with the "fixedsmall" posterior variance. The final step (t_prev = -1) has
sigma = 0 for every eta.

``alphas_bar`` is a (T,) float32 table: pass ``schedule.alphas_bar.float()`` (Schedule keeps it in
float64).

Backends: the C++ extension (CPU: float32; CUDA: float32 / float16 / bfloat16, launched on the
current stream, no host sync, so it can be captured in a CUDA graph) and the pure-torch reference
``ddim_step_reference``. The extension's CPU path is bit-identical to the reference (same operation
order, no fma contraction). While torch.compile traces, the extension is reached through the custom
op ``torch.ops.cbdm_fast.ddim_step`` (with a fake implementation), so ``torch.compile(fullgraph=True)``
over a sampling step sees no graph break; in eager mode the launch is called directly.

Range check of t / t_prev (t in [0, T), t_prev in [-1, t)): a host-side check needs a device sync,
so it runs for CPU tensors always and for CUDA tensors only when ``CBDM_FAST_CHECKS=1`` (never inside
a CUDA graph capture or while torch.compile traces). Without it, a bad pair on CUDA gives NaN for
that sample in the extension (the kernel never reads out of bounds) and a device-side assert or
garbage in the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._common import (EXTENSION_BACKENDS, check_backend, check_device, check_images, check_real, check_t,
                      check_t_range, check_tensor, clipped, combine_guided, fast_path, value_checks_run)

__all__ = ["ddim_step", "ddim_step_reference"]

BACKENDS = EXTENSION_BACKENDS
_OP = "ddim_step"


def _validate(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega) -> tuple[float, float]:
    """Checks every argument; returns (eta, omega) as floats. Raises TypeError (wrong type or dtype) or
    ValueError (shape, device, layout or value), naming the argument."""
    check_images(_OP, [("x_t", x_t), ("eps_c", eps_c), ("eps_u", eps_u), ("noise", noise)],
                 optional=("eps_u", "noise"))
    eta = check_real(_OP, "eta", eta, 0.0, hint=" (0: deterministic DDIM, 1: DDPM-like)")
    if eta > 1:  # sigma can exceed sqrt(1 - ab_s): no real c_dir, the step is not DDIM's any more
        raise ValueError(f"{_OP}: eta must be <= 1 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    omega = check_real(_OP, "omega", omega, hint=" (the guidance strength)")
    if eta > 0 and noise is None:
        raise ValueError(f"{_OP}: noise is required when eta > 0 (got eta = {eta} and noise = None)")
    B = x_t.shape[0]
    check_t(_OP, t, B, x_t.device)
    check_t(_OP, t_prev, B, x_t.device, name="t_prev")
    check_tensor(_OP, "alphas_bar", alphas_bar)
    if alphas_bar.dtype != torch.float32:
        raise TypeError(f"{_OP}: alphas_bar must be float32 (pass schedule.alphas_bar.float()), "
                        f"got dtype {alphas_bar.dtype}")
    if alphas_bar.dim() != 1 or alphas_bar.shape[0] < 1:
        raise ValueError(f"{_OP}: alphas_bar must have shape (T,) with T >= 1, got shape {tuple(alphas_bar.shape)}")
    if not alphas_bar.is_contiguous():
        raise ValueError(f"{_OP}: alphas_bar must be contiguous (call .contiguous())")
    check_device(_OP, "alphas_bar", alphas_bar, "x_t", x_t)
    check_t_range(_OP, t, alphas_bar.shape[0])
    if B > 0 and value_checks_run(t_prev):
        if int(t_prev.min()) < -1:
            raise ValueError(f"{_OP}: t_prev must be >= -1 (-1: the final step to x_0), got {int(t_prev.min())}")
        bad = (t_prev >= t).nonzero()
        if bad.numel() > 0:
            b = int(bad[0, 0])
            raise ValueError(f"{_OP}: t_prev must be < t for every sample, got t_prev[{b}] = "
                             f"{int(t_prev[b])} >= t[{b}] = {int(t[b])}")
    return eta, omega


def _coefficients(t, t_prev, alphas_bar, eta):
    """Per-sample float32 (B,) coefficients (sqrt_ab_t, sqrt_1m_ab_t, sqrt_ab_s, c_dir, sigma), in the
    extension's order of operations (csrc/ddim_step.h, ddim_coefs): float64 math, rounded at the end.
    (float64 because torch's float32 sqrt on CPU is not always correctly rounded; its float64 ops are.)"""
    ab_t = alphas_bar[t].double()
    ab_s = torch.where(t_prev >= 0, alphas_bar[t_prev.clamp(min=0)].double(), torch.ones_like(ab_t))
    one_m_ab_t = 1.0 - ab_t
    one_m_ab_s = 1.0 - ab_s
    ratio = (1.0 - ab_t / ab_s).clamp(min=0.0)
    sigma = eta * torch.sqrt(one_m_ab_s / one_m_ab_t) * torch.sqrt(ratio)
    c_dir = torch.sqrt((one_m_ab_s - sigma * sigma).clamp(min=0.0))
    return tuple(c.float() for c in (torch.sqrt(ab_t), torch.sqrt(one_m_ab_t), torch.sqrt(ab_s), c_dir, sigma))


def ddim_step_reference(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
                        t_prev: torch.Tensor, noise: Optional[torch.Tensor], alphas_bar: torch.Tensor,
                        eta: float = 0.0, omega: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """The pure-torch step in float32 (see the module docstring). Accepts any layout and any floating
    dtype (computed in float32, returned in x_t's dtype)."""
    eta, omega = _validate(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega)
    return _reference(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, bool(clip_x0))


def _reference(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0):
    shape = (x_t.shape[0],) + (1,) * (x_t.dim() - 1)
    sqrt_ab_t, sqrt_1m_ab_t, sqrt_ab_s, c_dir, sigma = (
        c.view(shape) for c in _coefficients(t, t_prev, alphas_bar, eta))
    x = x_t.float()
    eps = combine_guided(eps_c, eps_u, omega)
    x0 = clipped((x - sqrt_1m_ab_t * eps) / sqrt_ab_t, clip_x0)
    x_prev = sqrt_ab_s * x0 + c_dir * eps
    if eta > 0:  # eta == 0: sigma == 0 everywhere, the noise is not read
        x_prev = torch.where(sigma > 0, x_prev + sigma * noise.float(), x_prev)
    return x_prev.to(x_t.dtype)


def _extension_step(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0):
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    t = t.contiguous()
    t_prev = t_prev.contiguous()
    if eta == 0:
        noise = None  # deterministic: the noise is never read
    B = x_t.shape[0]
    pointers = (out.data_ptr(), x_t.data_ptr(), eps_c.data_ptr(), 0 if eps_u is None else eps_u.data_ptr(),
                t.data_ptr(), t_prev.data_ptr(), 0 if noise is None else noise.data_ptr(), alphas_bar.data_ptr())
    _extension.launch(_OP, x_t, pointers, (B, x_t.numel() // B, alphas_bar.shape[0], eta, omega, clip_x0))
    return out


@torch.library.custom_op("cbdm_fast::ddim_step", mutates_args=())
def _ddim_step_op(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
                  t_prev: torch.Tensor, noise: Optional[torch.Tensor], alphas_bar: torch.Tensor, eta: float,
                  omega: float, clip_x0: bool) -> torch.Tensor:
    # inputs contiguous, no autograd, the extension loaded (guaranteed by ddim_step)
    return _extension_step(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0)


@_ddim_step_op.register_fake
def _(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def ddim_step(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], t: torch.Tensor,
              t_prev: torch.Tensor, noise: Optional[torch.Tensor], alphas_bar: torch.Tensor, eta: float = 0.0,
              omega: float = 0.0, clip_x0: bool = False, backend: str = "auto") -> torch.Tensor:
    """One guided DDIM step x_t -> x_{t_prev}; returns a new tensor of x_t's dtype and shape.

    x_t, eps_c, eps_u, noise: (B, ...) same shape, dtype and device; eps_u=None means no guidance;
    noise may be None when eta == 0 (and is ignored then). t: (B,) int64 in [0, T); t_prev: (B,)
    int64 in [-1, t) (-1: the final step to x_0). alphas_bar: (T,) float32 contiguous -- pass
    ``schedule.alphas_bar.float()``. eta: in [0, 1]: 0 deterministic DDIM, 1 DDPM-like noise.
    omega: finite guidance strength (ignored when eps_u is None). clip_x0: clamp x0 to [-1, 1].
    backend: "auto" (the extension when it is loaded and supports the device, dtype and layout,
    else the reference), "extension" (raises when it cannot run: RuntimeError if it is not available,
    ValueError for non-contiguous inputs, TypeError for a dtype it does not support), or "reference".
    Errors: TypeError for a wrong type/dtype, ValueError for a wrong shape, device or value (a NaN or
    infinite eta or omega included); each message names the argument. See the module docstring for
    when the timesteps' range is checked.
    """
    check_backend(_OP, backend, BACKENDS)
    eta, omega = _validate(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega)
    clip_x0 = bool(clip_x0)
    if backend == "reference" or x_t.numel() == 0:
        return _reference(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0)
    named = (("x_t", x_t), ("eps_c", eps_c), ("eps_u", eps_u), ("noise", noise if eta > 0 else None))
    if not fast_path(backend, "extension", _extension.blocker(_OP, x_t, named)):
        return _reference(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0)
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0)
    return _extension_step(x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, eta, omega, clip_x0)
