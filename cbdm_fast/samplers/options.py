"""What a sampler of global sample indices is asked to run, checked once for every backend: the
algorithm (``SAMPLERS``), its timesteps, the guidance and the variance."""
from __future__ import annotations

import math
from typing import Literal, Optional, get_args

from ..schedule import VAR_TYPES
from .ddim import ddim_timesteps
from .guidance import check_guidance
from .noise import MAX_DRAWS

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple = get_args(Sampler)  # ancestral DDPM over all T steps, or DDIM over a sub-sequence


def timestep_pairs(sampler: str, T: int, steps: Optional[int] = None):
    """(t, t_prev) lists of a run: DDPM all T steps (t_prev = t - 1), DDIM the sub-sequence (t_prev = -1
    after the last)."""
    if sampler == "ddpm":
        if steps is not None and steps != T:
            raise ValueError(f"the ddpm sampler runs all T = {T} steps; steps={steps} needs sampler 'ddim'")
        ts = list(range(T - 1, -1, -1))
    elif sampler == "ddim":
        ts = ddim_timesteps(T, T if steps is None else steps)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return ts, ts[1:] + [-1]


def check_sampler_options(sampler: str, steps: Optional[int], eta: float, omega: float, method: str,
                          var_type: str, T: int) -> None:
    """ValueError naming the first option that is out of range or does not fit the others."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    check_guidance(method)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta applies to the ddim sampler only (ddpm's noise is set by var_type)")
    if not (math.isfinite(omega) and omega >= 0):
        raise ValueError(f"omega must be finite and >= 0, got {omega}")
    if var_type not in VAR_TYPES:
        raise ValueError(f"var_type must be fixedlarge or fixedsmall, got {var_type!r}")
    timestep_pairs(sampler, T, steps)  # raises for a bad steps
    if T + 1 > MAX_DRAWS:  # draw 0 is x_T, draw t + 1 the noise leaving t
        raise ValueError(f"per-sample noise supports T < {MAX_DRAWS - 1}, got T = {T}")
