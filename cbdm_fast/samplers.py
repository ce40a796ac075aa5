"""Ancestral DDPM sampling with classifier-free guidance (SPEC.md, Sampling).

``ddpm_sample`` is the sampler the CLI uses: the per-step update goes through ``ops.ddpm_step``
(the C++/CUDA extension when built, else the torch formula). ``reference_sample`` is the authors'
loop kept verbatim in spirit (fp32, two forwards per step, torch formula) as the baseline that
every faster sampler is tested against.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .schedule import Schedule, extract

METHODS = ("cfg", "cond", "uncond")


def class_balanced_labels(n_per_class: int, num_class: int, device=None) -> torch.Tensor:
    """Exactly n_per_class labels of every class, class 0 first: [0]*n, [1]*n, ..."""
    return torch.arange(num_class, device=device).repeat_interleave(n_per_class)


def uniform_labels(n: int, num_class: int, generator: Optional[torch.Generator] = None, device=None):
    """n i.i.d. uniform labels, as the authors draw them for evaluation."""
    return torch.randint(num_class, (n,), generator=generator).to(device)


def guided_eps(model, x_t, t, y, omega: float, method: str):
    """Returns (eps_c, eps_u): eps_u is None unless method == 'cfg' and omega > 0.

    As in the authors' sampler, the conditional pass gets a zero ADA vector (when the model has an
    ADA embedding) and the unconditional pass gets none.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    augm = None
    if getattr(model, "augm_embedding", None) is not None:
        augm = torch.zeros(x_t.shape[0], 9, device=x_t.device, dtype=x_t.dtype)
    y_c = None if method == "uncond" else y
    eps_c = model(x_t, t, y=y_c, augm=augm)
    eps_u = model(x_t, t, y=None, augm=None) if (method == "cfg" and omega > 0) else None
    return eps_c, eps_u


def batched_guided_eps(model, x_t, t, y, omega: float, method: str):
    """guided_eps with the conditional and unconditional passes as ONE forward of 2B.

    The second half gets y_mask = 0, which is exactly the unconditional pass (the label embedding
    is multiplied by 0); GroupNorm is per sample, so nothing mixes between the halves. A zero ADA
    vector on both halves equals the authors' (zeros, None) pair because that embedding has no bias.
    Falls back to guided_eps when there is no unconditional pass to batch.
    """
    if not (method == "cfg" and omega > 0):
        return guided_eps(model, x_t, t, y, omega, method)
    B = x_t.shape[0]
    mask = torch.cat([torch.ones(B, device=x_t.device), torch.zeros(B, device=x_t.device)])
    augm = None
    if getattr(model, "augm_embedding", None) is not None:
        augm = torch.zeros(2 * B, 9, device=x_t.device, dtype=x_t.dtype)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, y]), augm=augm, y_mask=mask)
    return out[:B], out[B:]


def _supports_label_mask(model) -> bool:
    return "y_mask" in inspect.signature(model.forward).parameters


def _check_sampling_args(model, x_T, y, method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "uncond":
        if y is None:
            raise ValueError(f"method {method!r} needs labels y")
        if y.shape != (x_T.shape[0],):
            raise ValueError(f"y must have shape ({x_T.shape[0]},), got {tuple(y.shape)}")
        if getattr(model, "label_embedding", 1) is None:
            raise ValueError(f"method {method!r} needs a conditional model (this one has cond=False)")


@torch.no_grad()
def ddpm_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                omega: float = 0.0, method: str = "cfg", var_type: str = "fixedlarge",
                clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                backend: str = "auto", progress: Optional[Callable[[int], None]] = None,
                batch_guidance: Optional[bool] = None) -> torch.Tensor:
    """Ancestral sampling from x_T over all T steps; returns x_0 clipped to [-1, 1].

    eps = eps_c + omega (eps_c - eps_u) (classifier-free guidance); the step
    x_{t-1} = coef1 x0_pred + coef2 x_t + sigma_t z (z = 0 at t = 0) runs in ops.ddpm_step.
    clip_x0=False is the authors' behaviour (their clip line has no effect); True clips x0_pred.
    Noise is drawn from ``generator`` (on x_T's device) so a run is reproducible.
    batch_guidance (default: when the model takes ``y_mask``, as our UNet does) runs the conditional
    and unconditional passes as one forward of 2B (``batched_guided_eps``).
    """
    from . import ops

    _check_sampling_args(model, x_T, y, method)
    if batch_guidance is None:
        batch_guidance = _supports_label_mask(model)
    eps_fn = batched_guided_eps if batch_guidance else guided_eps
    table = schedule.sampling_table(var_type).to(x_T.device)
    x_t = x_T.float().clone()
    for step in reversed(range(schedule.T)):
        t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
        eps_c, eps_u = eps_fn(model, x_t, t, y, omega, method)
        noise = (torch.randn(x_t.shape, generator=generator, device=x_t.device) if step > 0
                 else torch.zeros_like(x_t))
        x_t = ops.ddpm_step(x_t, eps_c.float(), None if eps_u is None else eps_u.float(), t, noise,
                            table, omega=omega, clip_x0=clip_x0, backend=backend)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)


@torch.no_grad()
def reference_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                     omega: float = 0.0, method: str = "cfg", var_type: str = "fixedlarge",
                     clip_x0: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The authors' sampling loop (GaussianDiffusionSampler), step by step in torch; the baseline."""
    _check_sampling_args(model, x_T, y, method)
    log_var = schedule.log_variance(var_type)
    x_t = x_T.float().clone()
    for step in reversed(range(schedule.T)):
        t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
        eps, eps_u = guided_eps(model, x_t, t, y, omega, method)
        if eps_u is not None:
            eps = eps + omega * (eps - eps_u)
        x_0 = (extract(schedule.sqrt_recip_alphas_bar, t, x_t.ndim) * x_t
               - extract(schedule.sqrt_recipm1_alphas_bar, t, x_t.ndim) * eps)
        if clip_x0:
            x_0 = x_0.clamp(-1.0, 1.0)
        mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x_0
                + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device) if step > 0 else 0
        x_t = mean + torch.exp(0.5 * extract(log_var, t, x_t.ndim)) * noise
    return x_t.clamp(-1.0, 1.0)
