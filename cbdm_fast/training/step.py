"""One CBDM training step, two ways, with the random draws separated from the update.

- ``draw_host`` + ``eager_step``: the authors' step (host-side label drop and y_bal, two forwards,
  per-tensor EMA loop). For the same RNG state it consumes the random streams exactly as
  ``Trainer.train_step`` does and produces bit-identical results.
- ``draw_device`` + ``fused_step``: every draw on the device with no host sync; the conditional and
  re-sampled-label passes batched into ONE forward of 2B (label drop as a multiply of the label
  embedding, so no host branch); multi-tensor clip, Adam and EMA (foreach lerp); optional bf16
  autocast and channels_last.

Because both steps take the same ``Draws``, they can be compared on identical randomness.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .losses import cbdm_terms

METHODS = ("uncond", "ddpm", "cfg", "cbdm")


@dataclass
class StepConfig:
    """What one step needs from the training configuration."""
    method: str = "cbdm"        # uncond | ddpm | cfg | cbdm
    tau: float = 1.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: bool = False           # bf16 autocast of the forward (fused step only)
    channels_last: bool = False  # channels_last input (fused step only; convert the model with prepare_model)

    @classmethod
    def from_train_config(cls, cfg, amp: bool = False, channels_last: bool = False) -> "StepConfig":
        return cls(method=cfg.method.method, tau=cfg.method.tau, grad_clip=cfg.optim.grad_clip,
                   ema_decay=cfg.optim.ema_decay, amp=amp, channels_last=channels_last)


def draw_flags(method: str, label_drop: float) -> tuple[float, bool]:
    """(drop_p, cb) for a method: the label drop applies to cfg and cbdm, the regulariser to cbdm."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    drop_p = float(label_drop) if method in ("cfg", "cbdm") else 0.0
    return drop_p, method == "cbdm"


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


def draw_host(B: int, x_0: torch.Tensor, y_bal_probs: torch.Tensor, T: int, drop_p: float, cb: bool,
              per_sample: bool = False) -> Draws:
    """The authors' draws, consuming the RNG streams exactly as ``Trainer.train_step`` does.

    t and noise on x_0's device; then on the host: one ``torch.rand(1)[0] < drop_p`` per batch (only if
    drop_p > 0), or a per-sample ``torch.rand(B)`` mask; y_bal by ``torch.multinomial`` on the host (only
    when cb and the labels were kept). Host decisions sync; this is the reference path.
    """
    device = x_0.device
    t = torch.randint(T, (B,), device=device)
    noise = torch.randn_like(x_0)
    keep = torch.ones((), device=device)
    if drop_p > 0:
        if per_sample:
            keep = (torch.rand(B) >= drop_p).float().to(device)
        elif torch.rand(1)[0] < drop_p:
            return Draws(t, noise, torch.zeros((), device=device), None)
    y_bal = torch.multinomial(y_bal_probs, B, replacement=True).to(device) if cb else None
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


def draw_device(B: int, x_0: torch.Tensor, class_cdf: Optional[torch.Tensor], T: int, drop_p: float, cb: bool,
                generator: Optional[torch.Generator] = None, per_sample: bool = False) -> Draws:
    """Every draw on x_0's device, with no host sync.

    keep = (rand(()) >= drop_p) (or rand(B) with per_sample); y_bal by inverse-CDF sampling,
    searchsorted(class_cdf, u, right=True) clamped to num_class - 1 (u at the rounded top end), and
    always drawn when cb: the fused step multiplies the regulariser by keep instead of branching.
    """
    device, g = x_0.device, generator
    t = torch.randint(T, (B,), device=device, generator=g)
    noise = torch.randn(x_0.shape, device=device, dtype=x_0.dtype, generator=g)
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


# ----------------------------------------------------------------------------------------- eager
def eager_step(model, ema, optimizer, scheduler, schedule, x_0: torch.Tensor, y: Optional[torch.Tensor],
               draws: Draws, cfg: StepConfig, augm: Optional[torch.Tensor] = None) -> dict:
    """The authors' step on given draws; the same arithmetic as ``Trainer.train_step``. augm: the
    (B, 9) ADA conditioning of the batch (cbdm_fast.data.ada), given to both forwards, or None.

    Returns detached loss tensors {"loss", "loss_ddpm", "loss_reg"}. The finite check (and .item())
    is the caller's; ``Trainer.train_step`` does it before backward.
    """
    from .training import ema_update  # the authors' per-tensor loop; imported late (training imports data)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    keep, y_bal, y_mask = draws.keep, draws.y_bal, None
    if cfg.method == "uncond":
        y, y_bal = None, None
    elif keep.ndim == 0:
        if not bool(keep):  # host branch: the whole batch is unconditional, no regulariser
            y, y_bal = None, None
    else:
        y_mask = keep
    t = draws.t
    x_t = schedule.q_sample(x_0, t, draws.noise)
    h = model(x_t, t, y=y, augm=augm, y_mask=y_mask)
    h_bal = model(x_t, t, y=y_bal, augm=augm, y_mask=y_mask) if y_bal is not None else None
    loss_ddpm, loss_reg = cbdm_terms(h, h_bal, draws.noise, t, schedule.T, cfg.tau, keep=y_mask)
    loss = loss_ddpm + loss_reg
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    ema_update(model, ema, cfg.ema_decay)
    return {"loss": loss.detach(), "loss_ddpm": loss_ddpm.detach(), "loss_reg": loss_reg.detach()}


# ----------------------------------------------------------------------------------------- fused
def make_optimizer(params, lr: float, device, capturable: bool = False) -> torch.optim.Adam:
    """Adam for the fast backends: fused=True on CUDA, foreach=True elsewhere.

    capturable (CUDA): every optimizer value lives on the device and the learning rate is a device
    tensor, so ``optimizer.step()`` can be recorded in a CUDA graph; the LR scheduler then updates
    that tensor in place between replays.
    """
    if torch.device(device).type == "cuda":
        if capturable:
            return torch.optim.Adam(params, lr=torch.tensor(float(lr), device=device), fused=True, capturable=True)
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


def prepare_model(model: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
    """Convert a model (and its EMA copy, call again) to channels_last when requested."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def ema_pairs(model: torch.nn.Module, ema: torch.nn.Module):
    """(ema floats, model floats, [(ema, model) non-float]) over parameters and buffers, paired by name.

    By name (not by position) so that a model patched with fused modules (cbdm_fast.nn.patch_model,
    which keeps every parameter name) still pairs with its unpatched EMA copy.
    """
    src = dict(model.named_parameters())
    src.update(model.named_buffers())
    dst = dict(ema.named_parameters())
    dst.update(ema.named_buffers())
    if src.keys() != dst.keys():
        missing = sorted(set(src) ^ set(dst))[:5]
        raise ValueError(f"model and EMA have different structures (names differ: {missing})")
    fd, fs, other = [], [], []
    for name, d in dst.items():
        s = src[name]
        if d.shape != s.shape:
            raise ValueError(f"model and EMA differ in the shape of {name}: {tuple(s.shape)} vs {tuple(d.shape)}")
        if d.is_floating_point():
            fd.append(d)
            fs.append(s.detach())
        else:
            other.append((d, s))
    return fd, fs, other


@torch.no_grad()
def ema_lerp_(ema_tensors, model_tensors, decay: float, other=()) -> None:
    """ema <- ema + (1 - decay) (model - ema) in one multi-tensor op.

    Mathematically the authors' ema * decay + model * (1 - decay); rounding differs by about one ulp
    of the EMA value per update (tests/test_fast_step.py measures it).
    """
    if ema_tensors:
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - decay)
    for d, s in other:
        d.copy_(s)


class _AdamSkip:
    """Undo Adam's update of some parameters when a 0-dim device flag is False, without a host sync.

    On a whole-batch label drop the eager path never uses the label embedding, so its grad is None
    and Adam skips it (no move, no moment decay, no step count). Here its grad is an exact 0, and
    Adam with a zero grad still moves the weight (m/sqrt(v) of earlier steps) and decays the moments;
    restoring weight and state with torch.where keeps the two backends the same algorithm.
    """

    def __init__(self, optimizer, params):
        self.optimizer, self.params = optimizer, params
        self.saved = [(p.detach().clone(),
                       {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                       if p in optimizer.state else None) for p in params]

    @torch.no_grad()
    def restore_unless(self, flag: torch.Tensor) -> None:
        for p, (old, old_state) in zip(self.params, self.saved):
            p.copy_(torch.where(flag, p, old))
            for k, v in self.optimizer.state[p].items():
                if torch.is_tensor(v):
                    prev = old_state[k] if old_state is not None else torch.zeros_like(v)  # == lazy init
                    v.copy_(torch.where(flag.to(v.device), v, prev))


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fused_step(model, ema, optimizer, scheduler, schedule, x_0: torch.Tensor, y: Optional[torch.Tensor],
               draws: Draws, cfg: StepConfig, ema_tensors=None, augm: Optional[torch.Tensor] = None) -> dict:
    """The fast step: no .item(), no host branching on tensor values.

    cbdm: ONE forward of [x_t; x_t] with t twice, labels [y; y_bal] and y_mask [keep; keep]; h, h_bal =
    out[:B], out[B:]; cbdm_terms with keep per sample, so a dropped batch (keep=0) trains h
    unconditionally with loss_reg = 0 and a zero gradient through h_bal, as the eager y=None branch.
    ddpm/cfg: one B forward with y_mask = keep. uncond: no labels. y_bal=None under cbdm (host draws
    of a dropped batch) is handled as a B-forward with keep.

    ``ema_tensors``: ``ema_pairs(model, ema)`` computed once by the caller (recomputed when None).
    ``augm``: the (B, 9) ADA conditioning of the batch, or None (it goes to both halves of the 2B batch).
    Returns detached loss tensors {"loss", "loss_ddpm", "loss_reg"}; nothing here syncs with the host.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    t, noise = draws.t, draws.noise
    B = x_0.shape[0]
    keep = draws.keep.expand(B) if draws.keep.ndim == 0 else draws.keep
    x_t = schedule.q_sample(x_0, t, noise)
    if cfg.channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with _autocast(x_0.device, cfg.amp):
        if cfg.method == "cbdm" and draws.y_bal is not None:
            out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, draws.y_bal]),
                        augm=None if augm is None else torch.cat([augm, augm]), y_mask=torch.cat([keep, keep]))
        elif cfg.method == "uncond":
            out = model(x_t, t, augm=augm)
        else:
            out = model(x_t, t, y=y, augm=augm, y_mask=keep)
    out = out.float()
    if out.shape[0] == 2 * B:
        h, h_bal = out[:B], out[B:]
        loss_ddpm, loss_reg = cbdm_terms(h, h_bal, noise, t, schedule.T, cfg.tau, keep=keep)
    else:
        loss_ddpm, loss_reg = cbdm_terms(out, None, noise, t, schedule.T, cfg.tau)
    loss = loss_ddpm + loss_reg
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    skip = None
    if cfg.method in ("cfg", "cbdm") and draws.keep.ndim == 0 and getattr(model, "label_embedding", None) is not None:
        skip = _AdamSkip(optimizer, list(model.label_embedding.parameters()))
    optimizer.step()
    if skip is not None:
        skip.restore_unless(draws.keep > 0)
    scheduler.step()
    fd, fs, other = ema_tensors if ema_tensors is not None else ema_pairs(model, ema)
    ema_lerp_(fd, fs, cfg.ema_decay, other)
    return {"loss": loss.detach(), "loss_ddpm": loss_ddpm.detach(), "loss_reg": loss_reg.detach()}
