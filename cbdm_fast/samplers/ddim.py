"""DDIM sampling (Song et al. 2021) with classifier-free guidance: the reference sampler over a
sub-sequence of the timesteps, deterministic at eta = 0."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ..schedule import Schedule
from .guidance import batched_guided_eps, check_labels, guided_eps, takes_label_mask


def ddim_timesteps(T: int, steps: int) -> list:
    """``steps`` timesteps evenly spaced over [0, T-1], both ends included, in sampling (descending)
    order: round(i (T-1) / (steps-1)); one step is [T-1]. ``steps == T`` gives every timestep."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T] = [1, {T}], got {steps}")
    if steps == 1:
        return [T - 1]
    ts = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
    return ts[::-1]


@torch.no_grad()
def ddim_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                omega: float = 0.0, method: str = "cfg", steps: Optional[int] = None, eta: float = 0.0,
                clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                backend: str = "auto", progress: Optional[Callable[[int], None]] = None,
                batch_guidance: Optional[bool] = None,
                noise_fn: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """Sample x_0 from x_T over ``steps`` timesteps (default all T); returns x_0 clipped to [-1, 1].

    eta = 0 is deterministic; eta = 1 over all T steps is DDPM with the fixedsmall variance, noise
    included. Noise (read only when eta > 0): ``noise_fn(t)``, the noise added when leaving timestep
    t, else ``generator``. backend, batch_guidance, method, omega and clip_x0 as in ``ddpm_sample``;
    backend='reference' with batch_guidance=False is the reference the fast sampler is tested against.
    """
    check_labels(model, x_T, y, method)
    eps_of = batched_guided_eps if takes_label_mask(model, batch_guidance) else guided_eps
    ts = ddim_timesteps(schedule.T, schedule.T if steps is None else steps)  # tau (section 4.2)
    alphas_bar = schedule.alphas_bar.float().to(x_T.device).contiguous()     # the paper's alpha_t

    x_t = x_T.float().clone()
    B = x_t.shape[0]
    for step, prev in zip(ts, ts[1:] + [-1]):           # tau_i -> tau_{i-1}; -1: the last step, to x_0
        t = torch.full((B,), step, dtype=torch.long, device=x_t.device)
        t_prev = torch.full((B,), prev, dtype=torch.long, device=x_t.device)
        eps_c, eps_u = eps_of(model, x_t, t, y, omega, method)
        z = None
        if eta > 0:  # (the final step has sigma = 0 and ignores it)
            z = noise_fn(step) if noise_fn is not None else torch.randn(x_t.shape, generator=generator,
                                                                         device=x_t.device)
        # eq. 12 with the guided eps = eps_c + omega (eps_c - eps_u) and x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t):
        #   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        #   sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)  (eq. 16)
        x_t = ops.ddim_step(x_t, eps_c.float(), None if eps_u is None else eps_u.float(), t, t_prev, z,
                            alphas_bar, eta=eta, omega=omega, clip_x0=clip_x0, backend=backend)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)
