"""The random draws of one CBDM training step (SPEC.md, Training, steps 1, 2 and 4), on the host as the
authors draw them or on the device without a host sync. Both give the same ``Draws``, so the eager and
the fused steps can be compared on identical randomness.

Each draw function takes ``like``: a tensor with the batch's shape, dtype and device (the batch itself,
or under data parallelism an expanded view of the GLOBAL batch's shape; training/ddp.py slices it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import GUIDED_METHODS, METHODS


@dataclass
class Draws:
    """The randomness of one step.

    t (B,) int64; noise like x_0; keep: float 0-dim (1.0 = labels kept, 0.0 = whole batch dropped) or,
    with per-sample drop, a (B,) 0/1 float mask; y_bal (B,) int64 or None (no regulariser this step).
    """
    t: torch.Tensor
    noise: torch.Tensor
    keep: torch.Tensor
    y_bal: Optional[torch.Tensor] = None


def draw_flags(method: str, label_drop: float) -> tuple[float, bool]:
    """(drop_p, cb) for a method: the label drop applies to cfg and cbdm, the regulariser to cbdm."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    drop_p = float(label_drop) if method in GUIDED_METHODS else 0.0
    return drop_p, method == "cbdm"


def draw_host(like: torch.Tensor, y_bal_probs: torch.Tensor, T: int, drop_p: float, cb: bool, *,
              per_sample: bool = False, generator: Optional[torch.Generator] = None,
              host_generator: Optional[torch.Generator] = None) -> Draws:
    """The authors' draws, in their order: t and noise on like's device (from ``generator``); then on
    the host (from ``host_generator``): one ``rand(1)[0] < drop_p`` per batch (only if drop_p > 0), or a
    per-sample ``rand(B)`` mask; y_bal by ``multinomial`` over y_bal_probs (only when cb and the labels
    were kept). None: the default generators. Host decisions sync; this is the reference path.
    """
    B, device = like.shape[0], like.device
    t = torch.randint(T, (B,), device=device, generator=generator)
    noise = torch.randn(like.shape, device=device, dtype=like.dtype, generator=generator)
    keep = torch.ones((), device=device)
    if drop_p > 0:
        if per_sample:
            keep = (torch.rand(B, generator=host_generator) >= drop_p).float().to(device)
        elif torch.rand(1, generator=host_generator)[0] < drop_p:
            return Draws(t, noise, torch.zeros((), device=device), None)
    y_bal = (torch.multinomial(y_bal_probs, B, replacement=True, generator=host_generator).to(device)
             if cb else None)
    return Draws(t, noise, keep, y_bal)


def class_cdf(probs: torch.Tensor, device=None) -> torch.Tensor:
    """Cumulative class probabilities for ``draw_device``, in float64.

    float64 because it costs nothing (num_class entries, B draws per step) and keeps the sampled
    frequencies exact to ~1e-16 even for tail classes of very long-tailed sets, where an fp32 CDF
    and fp32 uniforms (2^-24 grid) would bias each class by up to ~1e-7 absolute.
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 1 or (p < 0).any() or not p.sum() > 0:
        raise ValueError("class probabilities must be a non-negative 1-D tensor with a positive sum")
    return (torch.cumsum(p, 0) / p.sum()).to(device)


def draw_device(like: torch.Tensor, class_cdf: Optional[torch.Tensor], T: int, drop_p: float, cb: bool, *,
                per_sample: bool = False, generator: Optional[torch.Generator] = None) -> Draws:
    """Every draw on like's device, with no host sync (so a CUDA graph can record it).

    keep = (rand(()) >= drop_p) (or rand(B) with per_sample); y_bal by inverse-CDF sampling,
    searchsorted(class_cdf, u, right=True) clamped to num_class - 1 (u at the rounded top end), and
    always drawn when cb: the fused step multiplies the regulariser by keep instead of branching.
    """
    B, device, g = like.shape[0], like.device, generator
    t = torch.randint(T, (B,), device=device, generator=g)
    noise = torch.randn(like.shape, device=device, dtype=like.dtype, generator=g)
    if drop_p > 0:
        shape = (B,) if per_sample else ()
        keep = (torch.rand(shape, device=device, generator=g) >= drop_p).float()
    else:
        keep = torch.ones((), device=device)
    y_bal = None
    if cb:
        if class_cdf is None:
            raise ValueError("cb=True needs class_cdf")
        u = torch.rand((B,), device=device, dtype=class_cdf.dtype, generator=g) * class_cdf[-1]
        y_bal = torch.searchsorted(class_cdf, u, right=True).clamp_(max=class_cdf.shape[0] - 1)
    return Draws(t, noise, keep, y_bal)


def step_draws(method: str, label_drop: float, per_sample: bool, y_bal_probs: torch.Tensor, T: int, device, *,
               on_host: bool, generator: Optional[torch.Generator] = None,
               host_generator: Optional[torch.Generator] = None) -> Callable[[torch.Tensor], Draws]:
    """like -> Draws for a training method: the authors' host draws (on_host: the eager step) or the device
    draws (the fast step), from the given generators (None: the default ones)."""
    drop_p, cb = draw_flags(method, label_drop)
    common = dict(T=T, drop_p=drop_p, cb=cb, per_sample=per_sample, generator=generator)
    if on_host:
        return functools.partial(draw_host, y_bal_probs=y_bal_probs, host_generator=host_generator, **common)
    return functools.partial(draw_device, class_cdf=class_cdf(y_bal_probs, device) if cb else None, **common)
