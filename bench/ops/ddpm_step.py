"""Setup of ddpm_step at the sampling batches: torch: ops.ddpm_step_reference; fused: ops.ddpm_step(
backend="extension"); one guided ancestral step (omega 1.5, fixedlarge variances), t uniform in [0, T).
Contiguous only (the extension rejects other layouts); no backward, so forward only.

Bytes (n = elements of x_t, e = its element size, B batch):
    fwd   read x_t, eps_c, eps_u, noise, write x_{t-1}     5 n e + 8 B
"""
from __future__ import annotations

import torch

from cbdm_fast import ops
from cbdm_fast.schedule import Schedule

from .case import T, OpCase, step_cases

OMEGA = 1.5  # guidance strength of the sampling steps


def cases(size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    table = Schedule(T, device=device).sampling_table("fixedlarge").to(device)

    def setup(x_t, eps_c, eps_u, noise, g):
        t = torch.randint(0, T, (x_t.shape[0],), generator=g).to(device)
        return (x_t, eps_c, eps_u, t, noise, table, OMEGA)

    return step_cases("ddpm_step", size, dtype, device, seed, setup, ops.ddpm_step_reference, ops.ddpm_step,
                      fwd_bytes=lambda n, e, B: 5 * n * e + 8 * B, note=f"guided, omega {OMEGA}")
