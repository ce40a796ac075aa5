"""The training loop: the authors' algorithm (SPEC.md, Training), made resumable and safe.

One step, as in the authors' code: draw t, noise, the label drop and y_bal; loss = loss_ddpm +
loss_reg; backward; clip the gradient norm; Adam; warm-up scheduler; EMA of every weight.
Checkpoints hold everything needed to continue bit-exactly (RNG states and the data stream too).

Backends (cfg.run.backend): ``eager`` is that step exactly as the authors run it (fp32, two forwards,
host randomness, a host sync per step for the finite-loss check). ``fused`` and ``compiled`` run the
same algorithm through ``cbdm_fast.compiled_step.FastStep``: one 2B forward, every draw on the device
(the device's default generator, saved in checkpoints), fused Adam, foreach clip and EMA, bf16
autocast unless --precision fp32, channels_last on CUDA; ``compiled`` adds torch.compile and, on CUDA,
one CUDA graph per step. Their losses stay on the device: the loop reads them (one sync) only at log
points, and checks that every loss so far was finite there and before each checkpoint, so a NaN
stops the run naming its step and no checkpoint is written from diverged weights.

With --eval-every N, rank 0 scores the EMA model every N steps (cbdm_fast/evaluation/during_training.py:
own generators and per-sample noise, every RNG state and module mode restored, the data stream and the
training step's CUDA graph untouched) and logs TensorBoard eval/<name> and <logdir>/eval.jsonl; the other
ranks wait at a barrier.

Under torchrun (WORLD_SIZE > 1) every backend runs data-parallel with DistributedDataParallel, the
same algorithm on the global batch split across ranks; cbdm_fast/distributed.py explains how the
data, the random draws, checkpoints, RNG states and stops are kept exact and in step.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .files import checkpoint as ckpt_io
from . import dist
from . import distributed as dist_utils
from .config import TrainConfig
from .dist import resolve_device
from .data import BatchStream, load_dataset
from .data.ada import ada_augment
from .files.images import save_grid
from .losses import cbdm_terms
from .model import UNet, count_parameters
from .samplers import class_balanced_labels, ddpm_sample
from .schedule import Schedule
from .steps import StepConfig, class_cdf, draw_flags, make_optimizer, prepare_model


log_line = functools.partial(print, flush=True)  # flushed: progress must reach log files as it happens


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def resolve_backend(backend: str, precision: str, device: torch.device) -> tuple[str, bool]:
    """(backend, bf16 autocast) for the configured names: auto is compiled on CUDA, fused on CPU (on a
    CPU, compilation costs minutes up front for a small gain at these sizes; bench/RESULTS.md)."""
    if backend == "auto":
        backend = "compiled" if device.type == "cuda" else "fused"
    if backend == "eager":
        if precision == "bf16":
            raise ValueError("--precision bf16 needs --backend fused or compiled (eager is the authors' fp32 step)")
        return backend, False
    return backend, precision in ("auto", "bf16")


def resolve_storage(storage: str, nbytes: int, device: torch.device) -> str:
    """--data-on auto: the device when the uint8 data set takes under a quarter of its free memory
    (batches then cost no host work or copies), else host memory with pinned, asynchronous copies.
    On a CPU both are the same memory: device."""
    if storage != "auto":
        return storage
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes < free / 4 else "host"


def warmup_factor(warmup: int) -> Callable[[int], float]:
    """Linear learning-rate warm-up: factor min(step, warmup) / warmup (0 at the first step, as theirs)."""
    return (lambda step: 1.0) if warmup == 0 else (lambda step: min(step, warmup) / warmup)


@torch.no_grad()
def ema_update(source: torch.nn.Module, target: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source over every state-dict entry (the authors' loop)."""
    src = source.state_dict()
    for key, value in target.state_dict().items():
        value.copy_(value * decay + src[key] * (1 - decay))


class Trainer:
    """Holds model, EMA, optimiser, scheduler, data stream and RNG; ``run`` trains to cfg.optim.steps."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = log_line, load_pretrained: bool = True):
        self.cfg, self.log = cfg, log
        # under torchrun: join the process group (cuda -> cuda:LOCAL_RANK); else a no-op
        self.dist, self.device = dist.setup(resolve_device(cfg.run.device), batch_size=cfg.optim.batch_size)
        self.is_main = self.dist.is_main
        if not self.is_main:
            self.log = _silent  # rank 0 logs for everyone
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)

        d = cfg.data
        self.data = load_dataset(d.dataset, root=d.root, imb_factor=d.imb_factor, imb_type=d.imb_type,
                                 image_size=d.image_size)
        n, h, w, c = self.data.images.shape
        self.image_size, self.in_ch = h, c
        self.num_class = self.data.num_classes
        counts = self.data.counts()
        self.class_freq = torch.as_tensor(counts, dtype=torch.float64) / counts.sum()

        m = cfg.model
        self.unet_kwargs = dict(T=cfg.diffusion.T, ch=m.ch, ch_mult=list(m.ch_mult), attn=list(m.attn),
                                num_res_blocks=m.num_res_blocks, dropout=m.dropout,
                                cond=cfg.method.method != "uncond", augm=bool(d.augm),
                                num_class=self.num_class, in_ch=self.in_ch)
        self.model = UNet(**self.unet_kwargs).to(self.device)
        if cfg.method.finetune_from and load_pretrained:
            self._load_pretrained(cfg.method.finetune_from)
        self.backend, self.amp = resolve_backend(cfg.run.backend, cfg.run.precision, self.device)
        self.channels_last = self.backend != "eager" and self.device.type == "cuda"
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.backend == "eager":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr)
        else:
            prepare_model(self.model, self.channels_last)
            prepare_model(self.ema, self.channels_last)
            if self.backend == "fused" and self.device.type == "cuda":
                from .nn import patch_model  # Triton GroupNorm(+SiLU, +time embedding) and SDPA attention
                patch_model(self.model)
            self.optimizer = make_optimizer(self.model.parameters(), cfg.optim.lr, self.device,
                                            capturable=(self.backend == "compiled" and self.device.type == "cuda"
                                                        and not self.dist.enabled))  # no CUDA graph under DDP
        self._fast = None  # the FastStep, built at the first fast step (after a resume has loaded state)
        self._fast_start = 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_factor(cfg.optim.warmup))
        self.schedule = Schedule(cfg.diffusion.T, cfg.diffusion.beta_1, cfg.diffusion.beta_T, device=self.device)
        # ADA draws its own x-flip (its first parameter), as the authors' pipeline replaces RandomHorizontalFlip
        hflip = False if d.augm else (d.hflip if d.hflip is not None else d.dataset != "digits")
        # data parallel: the global batch's permutation on every rank, this rank's slice of each batch
        self.storage = resolve_storage(d.storage, self.data.images.nbytes, self.device)
        self.stream = BatchStream(self.data, cfg.optim.batch_size, hflip=hflip, seed=cfg.run.seed,
                                  device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
                                  storage=self.storage)
        self.step = 0
        self._stop_signal: Optional[int] = None
        self._stop_time = 0.0

        y_bal = cfg.method.y_bal
        if y_bal == "auto":
            y_bal = "uniform" if cfg.method.finetune_from else "train"
        self.y_bal_probs = (torch.full((self.num_class,), 1.0 / self.num_class, dtype=torch.float64)
                            if y_bal == "uniform" else self.class_freq)

        self._evaluator = None  # --eval-every: built on rank 0 when the run starts
        self._ddp = None        # the DDP-wrapped model (data parallel only)
        self._draw_host = None  # data parallel: the generators of the global batch's draws
        self._draw_dev = None
        if self.dist.enabled:
            self._setup_data_parallel()

    def _setup_data_parallel(self) -> None:
        """Draw generators in the state a single process's default generators have now (after model
        initialisation), per-rank default generators for dropout, and the DDP wrapper."""
        cpu = torch.device("cpu")
        self._draw_host = dist.clone_generator(torch.get_rng_state(), cpu)
        self._draw_dev = (self._draw_host if self.device.type == "cpu" else
                          dist.clone_generator(torch.cuda.get_rng_state(self.device), self.device))
        torch.manual_seed(dist.rank_seed(self.cfg.run.seed, self.dist.rank))
        if self.backend == "eager":
            # the whole-batch label drop leaves the label embedding unused: DDP must not wait for it
            self._ddp = dist_utils.wrap(dist_utils.EagerPair(self.model), self.device, find_unused_parameters=True)
        else:
            # the fused step keeps it in the graph with an exact-zero gradient: every parameter is used
            self._ddp = dist_utils.wrap(self.model, self.device, find_unused_parameters=False)

    # ----------------------------------------------------------------------------------- setup
    def _load_pretrained(self, path: str) -> None:
        """Fine-tuning starts from a checkpoint's EMA weights (ours or the authors'), as theirs does."""
        state = ckpt_io.model_state(ckpt_io.load(path), which="ema")
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ckpt_io.CheckpointError(
                f"--finetune-from {path}: its weights do not fit the model configured here "
                f"(check --ch, --ch-mult, --attn, --num-res-blocks and the data set's class count): {exc}"
            ) from exc

    def describe_step(self) -> str:
        if self.backend == "eager":
            return "step: eager (the authors' step: fp32, two forwards, host randomness)"
        extras = ["bf16 autocast" if self.amp else "fp32"]
        if self.channels_last:
            extras.append("channels_last")
        if self.backend == "compiled":
            extras.append("torch.compile" + (" + one CUDA graph per step" if self.device.type == "cuda" else " (inductor)"))
        elif self.device.type == "cuda":
            extras.append("Triton GroupNorm/attention")
        return f"step: {self.backend} (one 2B forward, device draws, fused optimizer; {', '.join(extras)})"

    def describe(self) -> str:
        counts = self.data.counts().tolist()
        names = self.data.class_names
        lines = [f"data: {self.cfg.data.dataset}, {len(self.data.labels)} images, {self.num_class} classes, "
                 f"{self.in_ch}x{self.image_size}x{self.image_size}, in {self.storage} memory "
                 f"({self.data.images.nbytes / 2**20:.1f} MiB uint8)",
                 "per-class counts (class 0 = head): " + ", ".join(f"{names[i]}:{c}" for i, c in enumerate(counts)),
                 f"model: UNet {count_parameters(self.model) / 1e6:.2f}M parameters on {self.device}; "
                 f"method {self.cfg.method.method}", self.describe_step()]
        if self.dist.enabled:
            ws = self.dist.world_size
            lines.append(f"data parallel: {ws} ranks (DDP over {'nccl' if self.device.type == 'cuda' else 'gloo'}), "
                         f"{self.cfg.optim.batch_size // ws} images per rank of the global batch "
                         f"{self.cfg.optim.batch_size}" + ("; no CUDA graph under DDP"
                                                           if self.backend == "compiled" and self.device.type == "cuda"
                                                           else ""))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- one step
    def draw_labels(self, y: torch.Tensor, B: int, generator: Optional[torch.Generator] = None,
                    part: Optional[slice] = None):
        """The label drop and y_bal, drawn on the host as the authors do.

        Returns (y or None, y_mask or None, y_bal or None): one drop draw per batch (y=None), or with
        per_sample_drop a 0/1 mask per sample; y_bal only when the regulariser is on and labels kept.
        Data parallel: B is the global batch, drawn from ``generator`` on every rank, and ``part``
        selects this rank's samples (so the drop is one draw per global batch that all ranks share).
        """
        mcfg = self.cfg.method
        part = slice(None) if part is None else part
        if mcfg.method == "uncond":
            return None, None, None
        y_mask = None
        if mcfg.method in ("cfg", "cbdm") and mcfg.label_drop > 0:
            if mcfg.per_sample_drop:
                y_mask = (torch.rand(B, generator=generator) >= mcfg.label_drop).float()[part].to(self.device)
            elif torch.rand(1, generator=generator)[0] < mcfg.label_drop:
                return None, None, None
        y_bal = None
        if mcfg.method == "cbdm":
            y_bal = torch.multinomial(self.y_bal_probs, B, replacement=True, generator=generator)[part].to(self.device)
        return y, y_mask, y_bal

    def train_step(self) -> dict:
        """One optimisation step; returns the loss terms as floats (a host sync on every backend)."""
        if self.backend != "eager":
            values = {k: v.item() for k, v in self.fast_step().items()}
            self.check_finite()
            return values
        return self.eager_step()

    def _build_fast(self):
        from .compiled_step import FastStep
        cfg = self.cfg
        scfg = StepConfig.from_train_config(cfg, amp=self.amp, channels_last=self.channels_last)
        drop_p, cb = draw_flags(cfg.method.method, cfg.method.label_drop)
        cdf = class_cdf(self.y_bal_probs, self.device) if cb else None
        self._fast_start = self.step
        if self._ddp is not None:
            return dist_utils.DistributedFastStep(
                self.model, self._ddp, self._draw_dev, self.dist, self.ema, self.optimizer, self.scheduler,
                self.schedule, scfg, cdf, drop_p, per_sample=cfg.method.per_sample_drop, backend=self.backend)
        return FastStep(self.model, self.ema, self.optimizer, self.scheduler, self.schedule, scfg, cdf, drop_p,
                        per_sample=cfg.method.per_sample_drop, backend=self.backend)

    def _next_batch(self):
        """(x_0, y, augm): the next batch, ADA-augmented on the device when --augm (its draws from the
        data stream's generator, which checkpoints save), else augm None."""
        x_0, y = self.stream.next()
        if not self.cfg.data.augm:
            return x_0, y, None
        if self.dist.enabled:  # the global batch's parameters (every rank draws the same), this rank's rows
            part = dist_utils.rank_slice(self.dist, x_0.shape[0])
            x_0, augm = ada_augment(x_0, generator=self.stream.generator, global_batch=self.stream.batch_size,
                                    part=part)
        else:
            x_0, augm = ada_augment(x_0, generator=self.stream.generator)
        return x_0, y, augm

    def fast_step(self) -> dict:
        """One step of the fused/compiled backend; returns device loss tensors (no host sync)."""
        if self._fast is None:
            self._fast = self._build_fast()
        x_0, y, augm = self._next_batch()
        out = self._fast(x_0, y if self.cfg.method.method != "uncond" else None, augm)
        self.step += 1
        return out

    def check_finite(self) -> None:
        """Fast backends: raise TrainingDiverged if any loss so far was NaN or infinite (one sync)."""
        if self._fast is None:
            return
        from .compiled_step import NonFiniteLoss
        try:
            self._fast.check_finite()
        except NonFiniteLoss as exc:
            raise TrainingDiverged(f"loss is not finite at step {self._fast_start + exc.step}") from None

    def eager_step(self) -> dict:
        """One optimisation step of the eager reference path; returns the loss terms as floats."""
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        x_0, y, augm = self._next_batch()
        B = x_0.shape[0]
        if self._ddp is not None:
            return self._eager_step_ddp(x_0, y, augm)
        t = torch.randint(self.schedule.T, (B,), device=self.device)
        noise = torch.randn_like(x_0)
        y, y_mask, y_bal = self.draw_labels(y, B)

        x_t = self.schedule.q_sample(x_0, t, noise)
        h = self.model(x_t, t, y=y, augm=augm, y_mask=y_mask)
        h_bal = self.model(x_t, t, y=y_bal, augm=augm, y_mask=y_mask) if y_bal is not None else None
        loss_ddpm, loss_reg = cbdm_terms(h, h_bal, noise, t, self.schedule.T, cfg.method.tau, keep=y_mask)
        loss = loss_ddpm + loss_reg
        values = {"loss": loss.item(), "loss_ddpm": loss_ddpm.item(), "loss_reg": loss_reg.item()}
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(f"loss is {values['loss']} at step {self.step + 1} "
                                   f"(loss_ddpm={values['loss_ddpm']}, loss_reg={values['loss_reg']})")
        loss.backward()
        return self._update(values)

    def _update(self, values: dict) -> dict:
        """The eager step's update after backward, as the authors do it: clip to grad_clip, Adam, the
        warm-up scheduler, the per-tensor EMA; returns ``values``."""
        cfg = self.cfg
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.model, self.ema, cfg.optim.ema_decay)
        self.step += 1
        return values

    def _eager_step_ddp(self, x_0: torch.Tensor, y: torch.Tensor, augm: Optional[torch.Tensor] = None) -> dict:
        """The eager step on this rank's slice: the global batch's draws (the single process's exact
        calls, from the shared draw generators) sliced, both forwards in one DDP call, the losses'
        global means for the finite check and the log."""
        cfg, ctx = self.cfg, self.dist
        b = x_0.shape[0]
        B, part = b * ctx.world_size, dist_utils.rank_slice(ctx, b)
        t = torch.randint(self.schedule.T, (B,), device=self.device, generator=self._draw_dev)[part]
        noise = torch.randn((B, *x_0.shape[1:]), device=self.device, dtype=x_0.dtype,
                            generator=self._draw_dev)[part]
        y, y_mask, y_bal = self.draw_labels(y, B, generator=self._draw_host, part=part)

        x_t = self.schedule.q_sample(x_0, t, noise)
        h, h_bal = self._ddp(x_t, t, y=y, y_bal=y_bal, y_mask=y_mask, augm=augm)
        loss_ddpm, loss_reg = cbdm_terms(h, h_bal, noise, t, self.schedule.T, cfg.method.tau, keep=y_mask)
        loss = loss_ddpm + loss_reg
        terms = dist.all_reduce_mean(torch.stack([loss, loss_ddpm, loss_reg]).detach()).tolist()
        values = dict(zip(("loss", "loss_ddpm", "loss_reg"), terms))
        if not math.isfinite(values["loss"]):  # the global mean: every rank stops here together
            raise TrainingDiverged(f"loss is {values['loss']} at step {self.step + 1} "
                                   f"(loss_ddpm={values['loss_ddpm']}, loss_reg={values['loss_reg']})")
        loss.backward()
        if y is None and self.model.label_embedding is not None:
            # whole-batch drop: unused, so Adam must skip it as in one process (grad None, not 0)
            for p in self.model.label_embedding.parameters():
                p.grad = None
        return self._update(values)

    # ---------------------------------------------------------------------------- checkpoints
    def _rng_state(self) -> dict:
        """Single process: the default generators. Data parallel (a collective): the draw generators
        under the same keys, plus every rank's own (dropout) generators under 'ranks'."""
        if not self.dist.enabled:
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            return rng
        rng = {"cpu": self._draw_host.get_state()}
        own = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = self._draw_dev.get_state()
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        rng["ranks"] = dist.all_gather_object(own)
        rng["world_size"] = self.dist.world_size
        return rng

    def _load_rng_state(self, rng: dict, step: int) -> None:
        if not self.dist.enabled:  # a data-parallel checkpoint's draw streams continue here
            torch.set_rng_state(rng["cpu"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            return
        self._draw_host.set_state(rng["cpu"])
        if self.device.type == "cuda" and "cuda" in rng:
            self._draw_dev.set_state(rng["cuda"])
        ranks = rng.get("ranks")
        if ranks is not None and len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["cpu"])
            if self.device.type == "cuda" and "cuda" in own:
                torch.cuda.set_rng_state(own["cuda"], self.device)
        else:  # another world size: data and draws continue exactly; dropout streams are re-derived
            torch.manual_seed(dist.rank_seed(self.cfg.run.seed, self.dist.rank, step))
            self.log(f"note: the checkpoint was written by {len(ranks) if ranks else 1} process(es), this run has "
                     f"{self.dist.world_size}: data order and random draws continue exactly, dropout streams restart")

    def state_dict(self) -> dict:
        """Everything needed to continue; under data parallelism a collective (call on every rank)."""
        rng = self._rng_state()
        return {"format": ckpt_io.FORMAT, "step": self.step, "config": self.cfg.to_dict(),
                "unet": dict(self.unet_kwargs), "image_size": self.image_size,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng, "data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self._load_rng_state(state["rng"], int(state["step"]))
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path:
        """Write ckpt_<step>.pt atomically; under data parallelism call on every rank: rank 0 writes,
        then all wait at a barrier so no rank runs ahead of (or exits before) the file."""
        self.check_finite()  # never write diverged weights
        logdir = Path(self.cfg.run.logdir)
        state = self.state_dict()
        path = ckpt_io.checkpoint_path(logdir, self.step)
        if self.is_main:
            ckpt_io.remove_stale_temporaries(logdir)  # left by a run killed while it wrote
            ckpt_io.save_atomic(state, path)
            for old in ckpt_io.find_checkpoints(logdir)[:-self.cfg.run.keep_checkpoints]:
                old.unlink(missing_ok=True)
        dist.barrier()
        return path

    # -------------------------------------------------------------------------------- samples
    def sample_grid(self, path) -> Path:
        """EMA samples, one row per class (head class first), from a fixed seed so grids compare."""
        run = self.cfg.run
        per_class = max(1, run.sample_per_class)
        g = torch.Generator(device=self.device).manual_seed(run.seed + 1)
        if self.cfg.method.method == "uncond":
            y, method, omega, nrow = None, "uncond", 0.0, per_class
            n = per_class * self.num_class
        else:
            y = class_balanced_labels(per_class, self.num_class, device=self.device)
            method = "cfg" if self.cfg.method.method in ("cfg", "cbdm") else "cond"
            omega, nrow, n = run.sample_omega, per_class, len(y)
        x_T = torch.randn((n, self.in_ch, self.image_size, self.image_size), generator=g, device=self.device)
        x_0 = ddpm_sample(self.ema, self.schedule, x_T, y, omega=omega, method=method,
                          var_type=run.var_type, generator=g)
        return save_grid(x_0, path, nrow=nrow, upscale=max(1, 64 // self.image_size))

    # ---------------------------------------------------------------------------- evaluation
    def start_evaluation(self) -> None:
        """--eval-every: rank 0 builds the feature network and the real reference features once, before
        the first step, so a missing weights file stops the run at its start; every rank stops alike."""
        if not self.cfg.run.eval_every or self._evaluator is not None:
            return
        error = None
        if self.is_main:
            from .evaluation.during_training import DuringTrainingEvaluator
            try:
                self._evaluator = DuringTrainingEvaluator(self, log=self.log)
            except (ValueError, OSError) as exc:
                error = exc
        if dist.any_true(error is not None):
            raise error or ValueError("--eval-every: rank 0 could not set up the evaluation (its message says why)")
        if self._evaluator is not None:
            self.log(f"evaluation every {self.cfg.run.eval_every} steps: {self._evaluator.describe()}")

    def evaluate(self, writer) -> Optional[dict]:
        """Score the EMA model now (rank 0; the other ranks wait at a barrier): TensorBoard eval/<name>,
        one printed line, one line of <logdir>/eval.jsonl. Training state is untouched (see
        evaluation/during_training.py). A failed evaluation is reported and training goes on."""
        from .evaluation.during_training import JSONL_NAME, append_jsonl, summary_line

        metrics = None
        if self.is_main and self._evaluator is not None:
            ev, start = self._evaluator, time.perf_counter()
            try:
                metrics = ev.evaluate()
            except (ValueError, RuntimeError, OSError) as exc:  # a monitor must not end a long run
                print(f"warning: evaluation at step {self.step} failed: {exc}", file=sys.stderr, flush=True)
            if metrics is not None:
                seconds = time.perf_counter() - start
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{name}", value, self.step)
                writer.flush()
                record = {"step": self.step, "num_samples": ev.num_samples, "ddim_steps": ev.steps,
                          "omega": ev.omega, "seconds": round(seconds, 3), **metrics}
                append_jsonl(Path(self.cfg.run.logdir) / JSONL_NAME, record)
                self.log(summary_line(self.step, metrics, seconds, ev.num_samples, ev.steps))
        dist.barrier()
        return metrics

    # ---------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self._stop_signal is not None:  # a second signal: stop at once
            if self.dist.enabled and now - self._stop_time < 5.0:
                return  # torchrun forwards to its workers a signal that they may have had already
            raise KeyboardInterrupt
        self._stop_signal, self._stop_time = signum, now
        msg = f"{signal.Signals(signum).name} received: saving a checkpoint after this step..."
        if self.is_main:
            self.log("\n" + msg)
        else:
            print(f"[rank {self.dist.rank}] {msg}", file=sys.stderr, flush=True)

    def run(self) -> str:
        """Train until cfg.optim.steps. Returns 'done' or 'interrupted' (a signal; checkpoint saved).

        Raises TrainingDiverged on a NaN/inf loss, leaving the last good checkpoint as it was.
        """
        cfg, run = self.cfg, self.cfg.run
        logdir = Path(run.logdir)
        main, parallel = self.is_main, self.dist.enabled
        if main:  # data parallel: rank 0 alone writes config, TensorBoard, progress and samples
            (logdir / "samples").mkdir(parents=True, exist_ok=True)
            cfg.save(logdir / "config.json")
        self.start_evaluation()
        writer = _summary_writer(logdir) if main else _NullWriter()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = _progress(self.step, cfg.optim.steps, run.progress and main)
        status = "done"
        try:
            tick, tick_step = time.perf_counter(), self.step
            img_per_s = 0.0
            fast = self.backend != "eager"
            while self.step < cfg.optim.steps:
                out = self.fast_step() if fast else self.eager_step()
                now = time.perf_counter()
                refresh = main and (now - tick > 1.0 or self.step == cfg.optim.steps)
                log_now = bool(run.log_every) and self.step % run.log_every == 0
                if refresh:
                    if fast and self.device.type == "cuda":  # img/s of finished steps, not queued ones
                        torch.cuda.synchronize(self.device)
                        now = time.perf_counter()
                    img_per_s = (self.step - tick_step) * cfg.optim.batch_size / (now - tick)
                    tick, tick_step = now, self.step
                if refresh or log_now:
                    # fast backends: the only host syncs of the loop (read the losses, check finiteness)
                    values = {k: float(v) for k, v in out.items()}
                    # data parallel: only at log points, which every rank reaches at the same step
                    if fast and (log_now or not parallel):
                        self.check_finite()
                    bar.set_postfix(loss=f"{values['loss']:.4f}", loss_ddpm=f"{values['loss_ddpm']:.4f}",
                                    loss_reg=f"{values['loss_reg']:.4f}", img_s=f"{img_per_s:.0f}", refresh=False)
                bar.update(1)
                if log_now:
                    for name, value in values.items():
                        writer.add_scalar(f"train/{name}", value, self.step)
                    writer.add_scalar("train/lr", float(self.scheduler.get_last_lr()[0]), self.step)
                    writer.add_scalar("train/img_per_s", img_per_s, self.step)
                    if not run.progress:
                        self.log(f"step {self.step}/{cfg.optim.steps} loss {values['loss']:.5f} "
                                 f"loss_ddpm {values['loss_ddpm']:.5f} loss_reg {values['loss_reg']:.5f} "
                                 f"{img_per_s:.0f} img/s")
                stop = self._stop_signal is not None
                if parallel:  # a signal on any rank stops every rank after this same step
                    stop = dist.any_true(stop)
                    if stop and self._stop_signal is None:
                        self.log("\nanother rank received a signal: saving a checkpoint after this step...")
                if stop:
                    status = "interrupted"
                    break
                if run.eval_every and self.step % run.eval_every == 0:
                    # before the checkpoint: a run killed while evaluating redoes this evaluation on resume
                    self.evaluate(writer)
                if run.save_every and self.step % run.save_every == 0:
                    self.save_checkpoint()
                if main and run.sample_every and self.step % run.sample_every == 0 and self.step < cfg.optim.steps:
                    self.sample_grid(logdir / "samples" / f"{self.step:07d}.png")
            bar.close()
            path = self.save_checkpoint()
            if status == "interrupted":
                launcher = (f"torchrun --nproc_per_node {self.dist.world_size} -m cbdm_fast.train" if parallel
                            else "python -m cbdm_fast.train")
                self.log(f"stopped at step {self.step}; checkpoint {path}. "
                         f"Continue with: {launcher} --resume {path}")
            else:
                self.log(f"trained {self.step} steps; checkpoint {path}")
                if main:
                    grid = self.sample_grid(logdir / "samples" / f"{self.step:07d}.png")
                    self.log(f"EMA samples (one row per class, head first): {grid}")
        finally:
            bar.close()
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return status


def _silent(*args, **kwargs) -> None:
    pass


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


class _NullWriter:
    def add_scalar(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _summary_writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; keep training if it is absent
        return _NullWriter()
    return SummaryWriter(str(logdir))


def resume_trainer(path, overrides: Optional[dict] = None, log=log_line, state: Optional[dict] = None) -> Trainer:
    """A Trainer restored from one of our checkpoints; ``overrides`` may change run-control options.
    ``state``: the checkpoint already loaded from ``path`` (saves reading it twice)."""
    state = ckpt_io.load(path) if state is None else state
    if not ckpt_io.is_ours(state):
        raise ckpt_io.CheckpointError(f"--resume {path}: not a cbdm_fast training checkpoint "
                                      f"(to start from the authors' weights use --finetune-from)")
    cfg = TrainConfig.from_dict(state["config"])
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    trainer = Trainer(cfg, log=log, load_pretrained=False)  # the weights come from the checkpoint
    trainer.load_state_dict(state)
    return trainer


def dump_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
