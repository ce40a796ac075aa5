"""One guided DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2), in place, its coefficients read from
a device table at a device step counter.

Row ``step`` of ``coefs`` (an (M, 6) float32 table, ``samplers.dpm_solver.dpm_solver_coefficients``) holds
(w, inv_alpha_s, sigma_over_alpha_s, a, b, c) of the step s -> t; elementwise, in float32 whatever the
I/O dtype:

    eps     = eps_c + w * (eps_c - eps_u)           # classifier-free guidance; eps = eps_c if eps_u is None
    x0      = x * inv_alpha_s - sigma_over_alpha_s * eps   # the data prediction (x - sigma_s eps) / alpha_s
    x0      = clamp(x0, -1, 1)                      # only if clip_x0
    x_new   = a * x + b * x0 (+ c * x0_prev  where c != 0: x0_prev is not read at a first-order step)
    x       <- x_new;  x0_prev <- x0                # both written in place

so a = sigma_t / sigma_s and b x0 + c x0_prev = -alpha_t (exp(-h) - 1) D with D the first- or
second-order combination of the data predictions. Because the step index is a device tensor (not a
Python int), a CUDA graph of a whole sampling step -- the model, this op and ``step += 1`` -- replays
every step of a run with no host input.

Backends: the C++ extension (CPU: float32; CUDA: float32 / float16 / bfloat16, launched on the current
stream, no host sync: capturable in a CUDA graph) and the pure-torch reference ``dpm_step_reference``.
The extension's CPU path is bit-identical to the reference (same operation order, no fma contraction).
While torch.compile traces, the extension is reached through the mutating custom op
``torch.ops.cbdm_fast.dpm_step`` (with a fake implementation), so torch.compile sees no graph break.

Range check of step (in [0, M)): for CPU tensors always, for CUDA tensors only with CBDM_FAST_CHECKS=1
(it needs a host sync). Without it, a bad step on CUDA gives NaN in x and x0_prev from the extension
(it never reads out of bounds).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._common import (EXTENSION_BACKENDS, check_backend, check_device, check_images, check_tensor, clipped,
                      combine_guided, fast_path, value_checks_run)

__all__ = ["dpm_step", "dpm_step_reference"]

BACKENDS = EXTENSION_BACKENDS
COLUMNS = ("w", "inv_alpha_s", "sigma_over_alpha_s", "a", "b", "c")  # of the coefficient table
_OP = "dpm_step"


def _validate(x, eps_c, eps_u, x0_prev, coefs, step) -> None:
    """Checks every argument. Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout,
    aliasing or value), naming the argument."""
    check_images(_OP, [("x", x), ("eps_c", eps_c), ("eps_u", eps_u), ("x0_prev", x0_prev)], optional=("eps_u",))
    if not torch.compiler.is_compiling() and x.numel() > 0 and x.data_ptr() == x0_prev.data_ptr():  # (no trace)
        raise ValueError(f"{_OP}: x and x0_prev are the same memory; the step writes both (give x0_prev a buffer)")
    check_tensor(_OP, "coefs", coefs)
    if coefs.dtype != torch.float32:
        raise TypeError(f"{_OP}: coefs must be float32, got dtype {coefs.dtype}")
    if coefs.dim() != 2 or coefs.shape[0] < 1 or coefs.shape[1] != len(COLUMNS):
        raise ValueError(f"{_OP}: coefs must have shape (M, 6) with M >= 1 (columns {', '.join(COLUMNS)}), "
                         f"got shape {tuple(coefs.shape)}")
    if not coefs.is_contiguous():
        raise ValueError(f"{_OP}: coefs must be contiguous (call .contiguous())")
    check_device(_OP, "coefs", coefs, "x", x)
    check_tensor(_OP, "step", step)
    if step.dtype != torch.int64:
        raise TypeError(f"{_OP}: step must be an int64 tensor, got dtype {step.dtype}")
    if step.shape != (1,):
        raise ValueError(f"{_OP}: step must have shape (1,) (the row of coefs), got shape {tuple(step.shape)}")
    check_device(_OP, "step", step, "x", x)
    if value_checks_run(step):
        k = int(step)
        if not 0 <= k < coefs.shape[0]:
            raise ValueError(f"{_OP}: step must be in [0, M) = [0, {coefs.shape[0]}), got {k}")


def dpm_step_reference(x: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], x0_prev: torch.Tensor,
                       coefs: torch.Tensor, step: torch.Tensor, clip_x0: bool = False) -> None:
    """The pure-torch step in float32 (see the module docstring), writing x and x0_prev in place. Accepts
    any layout and any floating dtype (computed in float32, stored in x's dtype)."""
    _validate(x, eps_c, eps_u, x0_prev, coefs, step)
    _reference(x, eps_c, eps_u, x0_prev, coefs, step, bool(clip_x0))


def _reference(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0):
    w, inv_alpha_s, sigma_over_alpha_s, a, b, c = coefs.index_select(0, step).view(6, *(1,) * x.dim()).unbind(0)
    xf = x.float()
    eps = combine_guided(eps_c, eps_u, w)
    x0 = clipped(xf * inv_alpha_s - sigma_over_alpha_s * eps, clip_x0)
    x_new = a * xf + b * x0
    x_new = torch.where(c != 0, x_new + c * x0_prev.float(), x_new)  # a first-order step ignores x0_prev
    x.copy_(x_new)
    x0_prev.copy_(x0)


def _extension_step(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0):
    B = x.shape[0]
    pointers = (x.data_ptr(), eps_c.data_ptr(), 0 if eps_u is None else eps_u.data_ptr(), x0_prev.data_ptr(),
                coefs.data_ptr(), step.data_ptr())
    _extension.launch(_OP, x, pointers, (B, x.numel() // B, coefs.shape[0], clip_x0))


@torch.library.custom_op("cbdm_fast::dpm_step", mutates_args=("x", "x0_prev"))
def _dpm_step_op(x: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], x0_prev: torch.Tensor,
                 coefs: torch.Tensor, step: torch.Tensor, clip_x0: bool) -> None:
    # inputs contiguous, no autograd, the extension loaded (guaranteed by dpm_step)
    _extension_step(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0)


@_dpm_step_op.register_fake
def _(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0):
    return None


def dpm_step(x: torch.Tensor, eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], x0_prev: torch.Tensor,
             coefs: torch.Tensor, step: torch.Tensor, clip_x0: bool = False, backend: str = "auto") -> None:
    """One guided DPM-Solver++(2M) step at row ``step`` of ``coefs``: x <- x_new and x0_prev <- x0, in place.

    x, eps_c, eps_u, x0_prev: (B, ...) same shape, dtype and device, x and x0_prev distinct buffers;
    eps_u=None means no guidance. coefs: (M, 6) float32 contiguous (columns w, inv_alpha_s,
    sigma_over_alpha_s, a, b, c). step: (1,) int64 on x's device, in [0, M). clip_x0: clamp x0 to [-1, 1].
    backend: "auto" (the extension when it is loaded and supports the device, dtype and layout, else the
    reference), "extension" (raises when it cannot run: RuntimeError if it is not available, ValueError
    for non-contiguous inputs, TypeError for a dtype it does not support), or "reference".
    Errors: TypeError for a wrong type/dtype, ValueError for a wrong shape, device, layout or value; each
    message names the argument. See the module docstring for when step's range is checked.
    """
    check_backend(_OP, backend, BACKENDS)
    _validate(x, eps_c, eps_u, x0_prev, coefs, step)
    clip_x0 = bool(clip_x0)
    if backend == "reference" or x.numel() == 0:
        return _reference(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0)
    named = (("x", x), ("eps_c", eps_c), ("eps_u", eps_u), ("x0_prev", x0_prev))
    if not fast_path(backend, "extension", _extension.blocker(_OP, x, named)):
        return _reference(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0)
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.dpm_step(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0)
    return _extension_step(x, eps_c, eps_u, x0_prev, coefs, step, clip_x0)
