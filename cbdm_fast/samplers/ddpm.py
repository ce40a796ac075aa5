"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with classifier-free guidance: the reference
sampler, with the authors' variances (fixedlarge / fixedsmall) and their x0 parameterisation."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ..schedule import Schedule
from .guidance import batched_guided_eps, check_labels, guided_eps, takes_label_mask


@torch.no_grad()
def ddpm_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                omega: float = 0.0, method: str = "cfg", var_type: str = "fixedlarge",
                clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                backend: str = "auto", progress: Optional[Callable[[int], None]] = None,
                batch_guidance: Optional[bool] = None,
                noise_fn: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """Sample x_0 from x_T over all T steps; returns x_0 clipped to [-1, 1] (float32).

    method: 'cfg' (guided by omega), 'cond' or 'uncond' (samplers.GUIDANCE). clip_x0=False is the
    authors' behaviour (their clip line has no effect); True clips the predicted x_0.
    Noise: from ``generator`` (on x_T's device), or, when given, ``noise_fn(t)``: the noise added when
    leaving timestep t (e.g. a ``CounterNoise`` draw per sample).
    backend: the step op's ('auto': the C++/CUDA extension when built; 'reference': pure torch).
    batch_guidance: the two guidance passes as one forward of 2B (default: when the model declares
    ``takes_label_mask``). With backend='reference' and batch_guidance=False this is exactly the
    authors' loop (fp32, two forwards per step, their order of operations): the baseline every faster
    sampler is tested against.
    """
    check_labels(model, x_T, y, method)
    eps_of = batched_guided_eps if takes_label_mask(model, batch_guidance) else guided_eps
    # rows sqrt(1/ab_t), sqrt(1/ab_t - 1), posterior mean coefficients, sigma_t (var_type's)
    table = schedule.sampling_table(var_type).to(x_T.device)

    x_t = x_T.float().clone()                                   # 1: x_T ~ N(0, I)
    for step in reversed(range(schedule.T)):                    # 2: for t = T, ..., 1
        t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
        eps_c, eps_u = eps_of(model, x_t, t, y, omega, method)  # eps_theta(x_t, t) (and unconditional)
        if step == 0:                                           # 3: z ~ N(0, I) if t > 1, else z = 0
            z = torch.zeros_like(x_t)
        elif noise_fn is not None:
            z = noise_fn(step)
        else:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
        # 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with guided eps = eps_c + omega (eps_c - eps_u),
        #    x0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps and mu = coef1_t x0 + coef2_t x_t (the posterior mean)
        x_t = ops.ddpm_step(x_t, eps_c.float(), None if eps_u is None else eps_u.float(), t, z, table,
                            omega=omega, clip_x0=clip_x0, backend=backend)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)                                 # 6: return x_0
