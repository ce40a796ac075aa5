"""One CBDM training step (SPEC.md, Training), two ways, on given draws (training/draws.py):

- ``eager_step``: THE reference step, the authors' algorithm as they run it: ``losses.cbdm_loss`` (two
  forwards, h on y and h_bal on y_bal), a host check that the loss is finite, backward, clip, Adam and
  the per-tensor EMA loop. The Trainer runs it in one process and under DDP (``loss`` = the DDP-wrapped
  ``ddp.PairedLoss``), and the benchmark times it.
- ``fused_step``: the same algorithm with no host sync: the conditional and re-sampled-label passes
  batched into ONE forward of 2B (label drop as a multiply of the label embedding, so no host branch);
  multi-tensor clip, Adam and EMA (foreach lerp); optional bf16 autocast and channels_last. Its
  differentiable part (q_sample, the 2B forward, the loss terms) is ONE module, ``BatchedLoss``, which
  DDP wraps and torch.compile compiles whole, on our kernels (cbdm_fast.ops) or on torch's formulas
  (``StepConfig.kernels``). ``fast_step.FastStep`` runs it (draws on the device, optionally compiled and
  replayed as a CUDA graph).

Neither steps the learning-rate scheduler: the caller does, after each step (the warm-up factor does not
enter the EMA, so the order is the authors').
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from ..losses import cbdm_loss, cbdm_terms
from ..nn import patch_model
from .config import GUIDED_METHODS
from .draws import Draws

LOSS_NAMES = ("loss", "loss_ddpm", "loss_reg")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``step`` names the step (when known). Raised before the update
    (eager) or at the next check (fast), so the run stops without writing a checkpoint from it."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


@dataclass
class StepConfig:
    """What one step needs from the training configuration."""
    method: str = "cbdm"        # config.METHODS
    tau: float = 1.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: bool = False           # bf16 autocast of the forward (fused step only)
    channels_last: bool = False  # channels_last input (fused step only; convert the model with prepare_model)
    kernels: str = "inductor"   # config.KERNELS, resolved (fused step only; see BatchedLoss)

    @classmethod
    def from_train_config(cls, cfg, amp: bool = False, channels_last: bool = False,
                          kernels: str = "inductor") -> "StepConfig":
        return cls(method=cfg.method.method, tau=cfg.method.tau, grad_clip=cfg.optim.grad_clip,
                   ema_decay=cfg.optim.ema_decay, amp=amp, channels_last=channels_last, kernels=kernels)


def warmup_factor(warmup: int) -> Callable[[int], float]:
    """Linear learning-rate warm-up: factor min(step, warmup) / warmup (0 at the first step, as theirs)."""
    return (lambda step: 1.0) if warmup == 0 else (lambda step: min(step, warmup) / warmup)


# ----------------------------------------------------------------------------------------- eager
@torch.no_grad()
def ema_update(source: torch.nn.Module, target: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source over every state-dict entry (the authors' loop)."""
    src = source.state_dict()
    for key, value in target.state_dict().items():
        value.copy_(value * decay + src[key] * (1 - decay))


def eager_step(model, ema, optimizer, schedule, x_0: torch.Tensor, y: Optional[torch.Tensor], draws: Draws,
               cfg: StepConfig, *, augm: Optional[torch.Tensor] = None, loss=None,
               reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, step: Optional[int] = None) -> dict:
    """The authors' step on given draws; returns the detached loss terms {"loss", "loss_ddpm", "loss_reg"}
    (0-dim tensors, as fused_step's; their values were read once for the finite check).

    augm: the (B, 9) ADA conditioning of the batch (cbdm_fast.data.ada), given to both forwards, or None.
    loss: cbdm_loss's computation with (model, schedule) bound (default); data parallel: the DDP-wrapped
    ``ddp.PairedLoss``. reduce: the three loss values (a tensor) to their logged form; data parallel: the
    mean over ranks, so every rank checks the same value and stops at the same step. step: the step's
    number, named when the loss is not finite (TrainingDiverged, raised before the update).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # SPEC step 2: the label drop, one draw per batch (or, as an option, a 0/1 mask per sample)
    keep, y_bal, y_mask = draws.keep, draws.y_bal, None
    if cfg.method == "uncond":
        y, y_bal = None, None
    elif keep.ndim == 0:
        if not bool(keep):  # host branch: the whole batch is unconditional, no regulariser
            y, y_bal = None, None
    else:
        y_mask = keep
    # steps 1, 3, 4: x_t = q_sample(x_0, t, noise); h on y, h_bal on y_bal; loss_ddpm and loss_reg
    loss_fn = loss if loss is not None else functools.partial(cbdm_loss, model, schedule)
    loss_ddpm, loss_reg = loss_fn(x_0, y, draws.t, draws.noise, y_bal=y_bal, tau=cfg.tau, augm=augm, y_mask=y_mask)
    total = loss_ddpm + loss_reg
    terms = torch.stack([total, loss_ddpm, loss_reg]).detach()
    if reduce is not None:
        terms = reduce(terms)
    values = dict(zip(LOSS_NAMES, terms.tolist()))  # one host sync
    if not math.isfinite(values["loss"]):
        where = "" if step is None else f" at step {step}"
        raise TrainingDiverged(f"loss is {values['loss']}{where} (loss_ddpm={values['loss_ddpm']}, "
                               f"loss_reg={values['loss_reg']})", step)
    # step 5: loss = loss_ddpm + loss_reg; backward, clip the gradient norm, Adam, EMA of every weight
    total.backward()
    if y is None and getattr(model, "label_embedding", None) is not None:
        # whole-batch drop: the label embedding is unused, so Adam must skip it (grad None, not 0); DDP's
        # find_unused_parameters may have given it a zero gradient, one process leaves it None already
        for p in model.label_embedding.parameters():
            p.grad = None
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    ema_update(model, ema, cfg.ema_decay)
    return dict(zip(LOSS_NAMES, terms.unbind()))


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
    of the EMA value per update (tests/training/test_step.py measures it).
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


class BatchedLoss(torch.nn.Module):
    """The differentiable part of the fused step, as ONE module so that DDP wraps it (one forward per
    backward) and torch.compile sees it whole (SPEC.md, Training, steps 1, 3, 4):

        x_t = q_sample(x_0, t, noise)
        cbdm: out = eps([x_t; x_t], [t; t], [y; y_bal], y_mask [keep; keep]);  h, h_bal = out[:B], out[B:]
              (views of the one 2B output: no copies)
        (loss_ddpm, loss_reg) = the CBDM terms of h and h_bal, w = tau t / T times keep per sample, so a
              dropped label (keep 0) trains h unconditionally with loss_reg = 0 and no gradient into h_bal
        ddpm/cfg: one B forward with y_mask = keep; uncond: no labels; both with loss_reg = 0.

    cfg.kernels picks the kernels, never the math: "fused" runs x_t through ops.q_sample, the terms
    through ops.cb_loss and the model's GroupNorm(+SiLU, +time-embedding add) and attention through
    ops.group_norm_silu and SDPA (the model is patched IN PLACE here by nn.patch_model: parameters and
    their names unchanged; under torch.compile these are opaque custom ops); "inductor" runs the torch
    formulas (schedule.q_sample, losses.cbdm_terms, the model as it is), from which torch.compile's
    inductor generates its own kernels.
    """

    def __init__(self, model: torch.nn.Module, schedule, cfg: StepConfig):
        super().__init__()
        self.model, self.schedule, self.cfg = model, schedule, cfg
        self.fused = cfg.kernels == "fused"
        if self.fused:
            patch_model(model)  # a model patched before (by an earlier step on it) stays as it is

    def q_sample(self, x_0, t, noise):
        s = self.schedule
        if self.fused:
            return ops.q_sample(x_0, t, noise, s.sqrt_alphas_bar, s.sqrt_one_minus_alphas_bar)
        return s.q_sample(x_0, t, noise)

    def forward(self, x_0: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
                keep: torch.Tensor, y_bal: Optional[torch.Tensor] = None,
                augm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_ddpm, loss_reg), float32 scalars. keep: (B,) 0/1 per sample; y_bal None: no regulariser."""
        cfg, B = self.cfg, x_0.shape[0]
        x_t = self.q_sample(x_0, t, noise)
        if cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with _autocast(x_0.device, cfg.amp):
            if cfg.method == "cbdm" and y_bal is not None:
                out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, y_bal]),
                                 augm=None if augm is None else torch.cat([augm, augm]), y_mask=torch.cat([keep, keep]))
            elif cfg.method == "uncond":
                out = self.model(x_t, t, augm=augm)
            else:
                out = self.model(x_t, t, y=y, augm=augm, y_mask=keep)
        out = out.float()
        terms = ops.cb_loss if self.fused else cbdm_terms
        if out.shape[0] == 2 * B:
            return terms(out[:B], out[B:], noise, t, self.schedule.T, cfg.tau, keep=keep)
        return terms(out, None, noise, t, self.schedule.T, cfg.tau)


def fused_step(model, ema, optimizer, schedule, x_0: torch.Tensor, y: Optional[torch.Tensor], draws: Draws,
               cfg: StepConfig, *, augm: Optional[torch.Tensor] = None, loss=None, ema_tensors=None) -> dict:
    """The fast step: no .item(), no host branching on tensor values.

    BatchedLoss (one 2B forward under cbdm; y_bal=None, the host draws of a dropped batch, is a B forward
    with keep), then backward, multi-tensor clip, Adam (undone for the label embedding on a whole-batch
    drop, as the eager step skips it) and the EMA lerp.

    ``loss``: the BatchedLoss to run (compiled, or DDP-wrapped); None builds ``BatchedLoss(model, schedule,
    cfg)`` for this call, and ``ema_tensors`` None recomputes ``ema_pairs(model, ema)``: conveniences for one
    step (tests); a training loop builds both once and passes them, as FastStep does.
    ``augm``: the (B, 9) ADA conditioning of the batch, or None (it goes to both halves of the 2B batch).
    Returns detached loss tensors {"loss", "loss_ddpm", "loss_reg"}; nothing here syncs with the host.
    """
    loss_fn = BatchedLoss(model, schedule, cfg) if loss is None else loss
    loss_fn.train()
    optimizer.zero_grad(set_to_none=True)
    B = x_0.shape[0]
    keep = draws.keep.expand(B) if draws.keep.ndim == 0 else draws.keep
    loss_ddpm, loss_reg = loss_fn(x_0, y, draws.t, draws.noise, keep, draws.y_bal, augm)
    total = loss_ddpm + loss_reg
    total.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    skip = None
    if cfg.method in GUIDED_METHODS and draws.keep.ndim == 0 and getattr(model, "label_embedding", None) is not None:
        skip = _AdamSkip(optimizer, list(model.label_embedding.parameters()))
    optimizer.step()
    if skip is not None:
        skip.restore_unless(draws.keep > 0)
    fd, fs, other = ema_tensors if ema_tensors is not None else ema_pairs(model, ema)
    ema_lerp_(fd, fs, cfg.ema_decay, other)
    return dict(zip(LOSS_NAMES, (total.detach(), loss_ddpm.detach(), loss_reg.detach())))
