"""Samplers: each algorithm one function, the reference the fast paths are tested against.

    ddpm.py       ddpm_sample: ancestral DDPM (Ho et al. 2020) with classifier-free guidance
    ddim.py       ddim_sample: DDIM (Song et al. 2021), and its timestep sub-sequence
    dpm_solver.py dpm_solver_sample: DPM-Solver++(2M) (Lu et al. 2022), its time grids and coefficients
    guidance.py   GUIDANCE ('cfg' | 'cond' | 'uncond') and the guided noise predictions
    noise.py      CounterNoise: per-sample noise, a function of (seed, global sample index, draw)
    reference.py  ReferenceSampler: the reference samplers on global sample indices
    fast.py       FastSampler: one 2B forward, the extension's step, bf16, CUDA-graph replay
    options.py    SAMPLERS ('ddpm' | 'ddim' | 'dpm++2m') and the checks every sampler of indices shares
    backends.py   make_sampler('fast' | 'reference', ...)
    labels.py     class-balanced and uniform labels
"""
from .backends import SAMPLE_BACKENDS, make_sampler
from .ddim import ddim_sample, ddim_timesteps
from .ddpm import ddpm_sample
from .dpm_solver import SPACINGS, dpm_solver_sample, dpm_solver_timesteps
from .fast import FastSampler
from .guidance import GUIDANCE, batched_guided_eps, guided_eps
from .labels import class_balanced_labels, uniform_labels
from .noise import CounterNoise
from .options import SAMPLERS, timestep_pairs
from .reference import ReferenceSampler

__all__ = [
    "GUIDANCE", "SAMPLERS", "SAMPLE_BACKENDS", "SPACINGS", "CounterNoise", "FastSampler", "ReferenceSampler",
    "batched_guided_eps", "class_balanced_labels", "ddim_sample", "ddim_timesteps", "ddpm_sample",
    "dpm_solver_sample", "dpm_solver_timesteps",
    "guided_eps", "make_sampler", "timestep_pairs", "uniform_labels",
]
