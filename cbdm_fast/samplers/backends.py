"""``make_sampler``: the fast sampler or the reference one, behind one call (``sample --backend``)."""
from __future__ import annotations

from typing import Literal, get_args

from ..schedule import Schedule
from .fast import FastSampler
from .reference import ReferenceSampler

SampleBackend = Literal["fast", "reference"]
SAMPLE_BACKENDS: tuple = get_args(SampleBackend)
FAST_ONLY = ("amp", "cuda_graph", "channels_last", "step_backend", "patch", "compile")  # FastSampler's own


def make_sampler(backend: str, model, schedule: Schedule, shape, **kwargs):
    """``FastSampler`` (backend 'fast') or ``ReferenceSampler`` ('reference'); the fast-only keywords
    (amp, cuda_graph, channels_last, step_backend, patch, compile) are rejected for the reference
    backend unless None or False."""
    if backend == "fast":
        return FastSampler(model, schedule, shape, **kwargs)
    if backend == "reference":
        fast_only = set(FAST_ONLY) & {k for k, v in kwargs.items() if v is not None and v is not False}
        if fast_only:
            raise ValueError(f"the reference sampler takes no {sorted(fast_only)} (fp32, two forwards, Python loop)")
        return ReferenceSampler(model, schedule, shape, **{k: v for k, v in kwargs.items() if k not in FAST_ONLY})
    raise ValueError(f"backend must be one of {SAMPLE_BACKENDS}, got {backend!r}")
