"""The CBDM training objective (SPEC.md, Training): DDPM's denoising loss plus the
distribution-adjustment regulariser. All randomness is passed in, so the loss is exactly testable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import Schedule


def regulariser_weight(t: torch.Tensor, T: int, tau: float) -> torch.Tensor:
    """Per-sample weight w = tau * t / T, shaped (B, 1, 1, 1): stronger at noisier timesteps."""
    return t[:, None, None, None] / T * tau


def cbdm_terms(h: torch.Tensor, h_bal: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor,
               T: int, tau: float, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two loss terms from the network outputs.

    loss_ddpm = mean((h - noise)^2)
    loss_reg  = mean(w (h - sg(h_bal))^2 + 1/4 w (sg(h) - h_bal)^2),  w = tau t / T, sg = stop-gradient;
    the first term pulls h toward the re-sampled-label prediction, the second ("commitment") pulls
    h_bal toward h with a quarter of the weight. h_bal=None gives loss_reg = 0.
    keep (B,), optional 0/1: multiplies w per sample (samples whose label was dropped get no regulariser).
    """
    loss_ddpm = F.mse_loss(h, noise, reduction="none").mean()
    if h_bal is None:
        return loss_ddpm, torch.zeros((), device=h.device, dtype=loss_ddpm.dtype)
    w = regulariser_weight(t, T, tau)
    if keep is not None:
        w = w * keep.to(w.dtype)[:, None, None, None]
    loss_adjust = w * F.mse_loss(h, h_bal.detach(), reduction="none")
    loss_commit = w * F.mse_loss(h.detach(), h_bal, reduction="none")
    return loss_ddpm, (loss_adjust + 1 / 4 * loss_commit).mean()


def cbdm_loss(model, schedule: Schedule, x_0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
              noise: torch.Tensor, y_bal: torch.Tensor | None = None, tau: float = 1.0,
              augm: torch.Tensor | None = None, y_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_ddpm, loss_reg) for one batch, as the CBDM authors compute them.

    x_t = q_sample(x_0, t, noise); h = eps(x_t, t, y). With y_bal given and y not None, a second
    forward h_bal = eps(x_t, t, y_bal) on the SAME x_t and t feeds the regulariser. y=None trains
    unconditionally (the label-dropped batch of classifier-free guidance) and skips the regulariser.
    y_mask (B,), optional 0/1 (per-sample label drop): given to both forwards and to cbdm_terms as keep;
    passed to the model only when given, so models that know no mask work as before.
    """
    masked = {} if y_mask is None else {"y_mask": y_mask}
    x_t = schedule.q_sample(x_0, t, noise)
    h = model(x_t, t, y=y, augm=augm, **masked)
    h_bal = model(x_t, t, y=y_bal, augm=augm, **masked) if (y is not None and y_bal is not None) else None
    return cbdm_terms(h, h_bal, noise, t, schedule.T, tau, keep=y_mask)
