"""Classifier-free guidance (Ho & Salimans 2022): the two noise predictions a guided step combines.

    eps = eps_c + omega (eps_c - eps_u),  eps_c = eps(x_t, t, y),  eps_u = eps(x_t, t, no label)

The combination itself happens inside the step ops (``ops.ddpm_step`` / ``ops.ddim_step``), which
take eps_c and eps_u; here the model is asked for them, either as the authors do (two forwards) or
as ONE forward of 2B whose second half has its label masked out (``batched_guided_eps``).
"""
from __future__ import annotations

from typing import Literal, Optional, get_args

import torch

Guidance = Literal["cfg", "cond", "uncond"]
GUIDANCE: tuple = get_args(Guidance)  # guided by omega, conditional only, unconditional


def check_guidance(method: str) -> None:
    if method not in GUIDANCE:
        raise ValueError(f"method must be one of {GUIDANCE}, got {method!r}")


def is_guided(method: str, omega: float) -> bool:
    """Whether a step needs the unconditional prediction eps_u at all."""
    return method == "cfg" and omega > 0


def takes_label_mask(model, batch_guidance: Optional[bool] = None) -> bool:
    """Whether to batch the two guidance passes: ``batch_guidance`` when given, else what the model
    declares (``takes_label_mask``: its forward accepts ``y_mask``, as our UNet's does)."""
    if batch_guidance is not None:
        return bool(batch_guidance)
    return bool(getattr(model, "takes_label_mask", False))


def check_labels(model, x_T: torch.Tensor, y: Optional[torch.Tensor], method: str) -> None:
    """ValueError when ``method`` cannot run with these labels on this model."""
    check_guidance(method)
    if method == "uncond":
        return
    if y is None:
        raise ValueError(f"method {method!r} needs labels y")
    if y.shape != (x_T.shape[0],):
        raise ValueError(f"y must have shape ({x_T.shape[0]},), got {tuple(y.shape)}")
    check_conditional(model, method)


def check_conditional(model, method: str) -> None:
    if method != "uncond" and getattr(model, "label_embedding", 1) is None:
        raise ValueError(f"method {method!r} needs a conditional model (this one has cond=False)")


def _zero_augm(model, n: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The authors' sampler gives a model with an ADA embedding a zero augmentation vector."""
    if getattr(model, "augm_embedding", None) is None:
        return None
    return torch.zeros(n, 9, device=like.device, dtype=like.dtype)


def guided_eps(model, x_t, t, y, omega: float, method: str):
    """(eps_c, eps_u) in the authors' two forwards; eps_u is None unless the step is guided.

    As in their sampler, the conditional pass gets a zero ADA vector (when the model has an ADA
    embedding) and the unconditional pass gets none.
    """
    check_guidance(method)
    eps_c = model(x_t, t, y=None if method == "uncond" else y, augm=_zero_augm(model, x_t.shape[0], x_t))
    eps_u = model(x_t, t, y=None, augm=None) if is_guided(method, omega) else None
    return eps_c, eps_u


def batched_guided_eps(model, x_t, t, y, omega: float, method: str):
    """guided_eps as ONE forward of 2B (needs a model whose forward takes ``y_mask``).

    The second half gets y_mask = 0, which is exactly the unconditional pass (the label embedding is
    multiplied by 0); GroupNorm is per sample, so nothing mixes between the halves. A zero ADA
    vector on both halves equals the authors' (zeros, None) pair because that embedding has no bias.
    Without guidance there is one pass of B, as in guided_eps.
    """
    if not is_guided(method, omega):
        return guided_eps(model, x_t, t, y, omega, method)
    B = x_t.shape[0]
    mask = torch.cat([torch.ones(B, device=x_t.device), torch.zeros(B, device=x_t.device)])
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, y]),
                augm=_zero_augm(model, 2 * B, x_t), y_mask=mask)
    return out[:B], out[B:]
