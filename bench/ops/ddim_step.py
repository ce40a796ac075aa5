"""Setup of ddim_step at the sampling batches: torch: ops.ddim_step_reference; fused: ops.ddim_step(
backend="extension"); one guided deterministic step (omega 1.5, eta 0) from t uniform in [1, T) to
t_prev = t - 10, a step of DDIM-100 over T = 1000. Contiguous only; forward only.

Bytes (n = elements of x_t, e = its element size, B batch):
    fwd   read x_t, eps_c, eps_u, write x_prev     4 n e + 16 B (t, t_prev)
"""
from __future__ import annotations

import torch

from cbdm_fast import ops
from cbdm_fast.schedule import Schedule

from .case import T, OpCase, step_cases
from .ddpm_step import OMEGA

STRIDE = 10  # t_prev = t - 10: a DDIM-100 sub-sequence of T = 1000


def cases(size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    alphas_bar = Schedule(T, device=device).alphas_bar.float().contiguous()

    def setup(x_t, eps_c, eps_u, noise, g):
        t = torch.randint(1, T, (x_t.shape[0],), generator=g).to(device)
        t_prev = (t - STRIDE).clamp(min=-1)
        return (x_t, eps_c, eps_u, t, t_prev, None, alphas_bar, 0.0, OMEGA)

    return step_cases("ddim_step", size, dtype, device, seed, setup, ops.ddim_step_reference, ops.ddim_step,
                      fwd_bytes=lambda n, e, B: 4 * n * e + 16 * B,
                      note=f"guided, omega {OMEGA}, eta 0, t_prev = t - {STRIDE}")
