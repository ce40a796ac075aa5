"""``ReferenceSampler``: the reference samplers (``ddpm_sample``, ``ddim_sample``, ``dpm_solver_sample``
as the authors run a sampler: fp32, two forwards per step, the pure-torch step) on global sample indices,
with the same per-sample ``CounterNoise`` as the fast sampler, so the two are compared image for image."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..schedule import Schedule
from .ddim import ddim_sample
from .ddpm import ddpm_sample
from .dpm_solver import dpm_solver_sample
from .noise import CounterNoise, check_indices
from .options import check_sampler_options


class ReferenceSampler:
    """``sampler(y, index)`` -> x_0 in [-1, 1] (float32) for labels y (B,) (None for uncond) and
    global sample indices ``index`` (B,)."""

    def __init__(self, model, schedule: Schedule, shape, seed: int = 0, sampler: str = "ddpm",
                 steps: Optional[int] = None, eta: float = 0.0, omega: float = 0.0, method: str = "cfg",
                 var_type: str = "fixedlarge", clip_x0: bool = False, spacing: Optional[str] = None):
        check_sampler_options(sampler, steps, eta, omega, method, var_type, schedule, spacing)
        self.model, self.schedule = model, schedule
        self.device = next(model.parameters()).device
        self.noise = CounterNoise(seed, shape, self.device)
        self.sampler, self.steps, self.eta, self.var_type = sampler, steps, eta, var_type
        self.omega, self.method, self.clip_x0, self.spacing = omega, method, clip_x0, spacing

    @torch.no_grad()
    def __call__(self, y: Optional[torch.Tensor], index: torch.Tensor,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        check_indices(index)
        index = index.to(self.device, torch.int64)
        y = None if y is None else y.to(self.device, torch.int64)
        x_T = self.noise(index, 0)  # draw 0 is x_T; draw t + 1 the noise leaving timestep t
        common = dict(omega=self.omega, method=self.method, clip_x0=self.clip_x0, backend="reference",
                      batch_guidance=False, progress=progress)
        if self.sampler == "dpm++2m":  # deterministic after x_T
            return dpm_solver_sample(self.model, self.schedule, x_T, y, steps=self.steps, spacing=self.spacing,
                                     **common)
        common["noise_fn"] = lambda t: self.noise(index, t + 1)
        if self.sampler == "ddpm":
            return ddpm_sample(self.model, self.schedule, x_T, y, var_type=self.var_type, **common)
        return ddim_sample(self.model, self.schedule, x_T, y, steps=self.steps, eta=self.eta, **common)
