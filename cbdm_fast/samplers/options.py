"""What a sampler of global sample indices is asked to run, checked once for every backend: the
algorithm (``SAMPLERS``), its timesteps, the guidance and the variance."""
from __future__ import annotations

import math
from typing import Literal, Optional, get_args

from ..schedule import VAR_TYPES, Schedule
from .ddim import ddim_timesteps
from .dpm_solver import DEFAULT_STEPS, default_spacing, dpm_solver_timesteps
from .guidance import check_guidance
from .noise import MAX_DRAWS

Sampler = Literal["ddpm", "ddim", "dpm++2m"]
SAMPLERS: tuple = get_args(Sampler)  # ancestral DDPM over all T steps, DDIM over a sub-sequence, DPM-Solver++(2M)


def timestep_pairs(sampler: str, schedule: Schedule, steps: Optional[int] = None, spacing: Optional[str] = None):
    """(t, t_prev) lists of a run, one pair per model evaluation: DDPM all T steps (t_prev = t - 1), DDIM
    the sub-sequence (t_prev = -1 after the last), DPM-Solver++ its grid (``spacing``; t_prev = 0 at the last)."""
    T = schedule.T
    if sampler == "ddpm":
        if steps is not None and steps != T:
            raise ValueError(f"the ddpm sampler runs all T = {T} steps; steps={steps} needs sampler 'ddim' or "
                             f"'dpm++2m'")
        ts = list(range(T - 1, -1, -1))
    elif sampler == "ddim":
        ts = ddim_timesteps(T, T if steps is None else steps)
    elif sampler == "dpm++2m":
        steps = min(DEFAULT_STEPS, T - 1) if steps is None else steps
        grid = dpm_solver_timesteps(schedule, steps, spacing or default_spacing(schedule, steps))
        return grid[:-1], grid[1:]
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return ts, ts[1:] + [-1]


def check_sampler_options(sampler: str, steps: Optional[int], eta: float, omega: float, method: str,
                          var_type: str, schedule: Schedule, spacing: Optional[str] = None) -> None:
    """ValueError naming the first option that is out of range or does not fit the others."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    check_guidance(method)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if eta > 1:
        raise ValueError(f"eta must be <= 1 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"eta applies to the ddim sampler only (got sampler {sampler!r}; ddpm's noise is set by "
                         f"var_type, dpm++2m is deterministic)")
    if spacing is not None and sampler != "dpm++2m":
        raise ValueError(f"spacing applies to the dpm++2m sampler only, got spacing={spacing!r} with sampler "
                         f"{sampler!r}")
    if not (math.isfinite(omega) and omega >= 0):
        raise ValueError(f"omega must be finite and >= 0, got {omega}")
    if var_type not in VAR_TYPES:
        raise ValueError(f"var_type must be fixedlarge or fixedsmall, got {var_type!r}")
    timestep_pairs(sampler, schedule, steps, spacing)  # raises for a bad steps or spacing
    if schedule.T + 1 > MAX_DRAWS:  # draw 0 is x_T, draw t + 1 the noise leaving t
        raise ValueError(f"per-sample noise supports T < {MAX_DRAWS - 1}, got T = {schedule.T}")
