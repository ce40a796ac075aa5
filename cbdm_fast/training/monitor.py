"""What a run shows and records besides its checkpoints: config.json, the progress bar or printed lines,
TensorBoard train/* scalars, EMA sample grids, and evaluation during training (--eval-every: rank 0
scores the EMA model with cbdm_fast/training/evaluator.py, which leaves every generator, module
mode and the data stream as they were, also when a signal abandons it halfway; TensorBoard eval/<name>
and <logdir>/eval.jsonl). Under data parallelism rank 0 alone writes and prints.

The monitor reads the training state it is given (EMA model, schedule, data set) and never changes it.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dist
from ..dist import Context
from ..files.images import save_grid
from ..samplers import class_balanced_labels, ddpm_sample
from .evaluator import (JSONL_NAME, DuringTrainingEvaluator, append_jsonl, missing_feature_network,
                        sampling_guidance, summary_line)

log_line = functools.partial(print, flush=True)  # flushed: progress must reach log files as it happens


def silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def evaluation_problem(cfg) -> Optional[str]:
    """Why --eval-every cannot run with this configuration (no feature network for its data set), or None;
    asked before a run starts, so the run stops before its first step."""
    if not cfg.run.eval_every:
        return None
    return missing_feature_network(cfg.data.dataset, cfg.run.inception_weights)


def describe_run(cfg, data, storage: str, num_parameters: int, device: torch.device, ctx: Context, backend: str,
                 amp: bool, channels_last: bool, kernels: str, kernels_why: str) -> str:
    """The lines printed before training: data, model, step (and data parallelism)."""
    n, size, _, channels = data.images.shape
    counts, names = data.counts().tolist(), data.class_names
    lines = [f"data: {cfg.data.dataset}, {n} images, {data.num_classes} classes, {channels}x{size}x{size}, "
             f"in {storage} memory ({data.images.nbytes / 2**20:.1f} MiB uint8)",
             "per-class counts (class 0 = head): " + ", ".join(f"{names[i]}:{c}" for i, c in enumerate(counts)),
             f"model: UNet {num_parameters / 1e6:.2f}M parameters on {device}; method {cfg.method.method}",
             describe_step(backend, amp, channels_last, device, kernels, kernels_why)]
    if ctx.enabled:
        ws, graph = ctx.world_size, backend == "compiled" and device.type == "cuda"
        lines.append(f"data parallel: {ws} ranks (DDP over {'nccl' if device.type == 'cuda' else 'gloo'}), "
                     f"{cfg.optim.batch_size // ws} images per rank of the global batch {cfg.optim.batch_size}"
                     + ("; no CUDA graph under DDP" if graph else ""))
    return "\n".join(lines)


def describe_step(backend: str, amp: bool, channels_last: bool, device: torch.device, kernels: str,
                  kernels_why: str) -> str:
    if backend == "eager":
        return "step: eager (the authors' step: fp32, two forwards, host randomness)"
    extras = ["bf16 autocast" if amp else "fp32"] + (["channels_last"] if channels_last else [])
    if backend == "compiled":
        extras.append("torch.compile" + (" + one CUDA graph per step" if device.type == "cuda" else " (inductor)"))
    what = ("ours: q_sample, CBDM loss, GroupNorm+SiLU and SDPA attention from cbdm_fast.ops" if kernels == "fused"
            else "torch's formulas" + (", inductor's kernels" if backend == "compiled" else ""))
    return (f"step: {backend} (one 2B forward, device draws, fused optimizer; {', '.join(extras)})\n"
            f"kernels: {kernels} ({what}){'; ' + kernels_why if kernels_why else ''}")


class NullWriter:
    """TensorBoard's SummaryWriter where nothing is written (ranks other than 0, or no tensorboard)."""

    def add_scalar(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def summary_writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; keep training if it is absent
        return NullWriter()
    return SummaryWriter(str(logdir))


@torch.no_grad()
def sample_grid(ema, schedule, cfg, data, device: torch.device, path) -> Path:
    """EMA samples, one row per class (head class first), from a fixed seed so grids compare; the
    authors' ancestral sampler, guided as the run's method is (cfg/cbdm with --sample-omega)."""
    run = cfg.run
    _, size, _, channels = data.images.shape
    num_class, per_class = data.num_classes, run.sample_per_class
    g = torch.Generator(device=device).manual_seed(run.seed + 1)
    method, omega = sampling_guidance(cfg.method.method, run.sample_omega)
    if method == "uncond":
        y, n = None, per_class * num_class
    else:
        y = class_balanced_labels(per_class, num_class, device=device)
        n = len(y)
    x_T = torch.randn((n, channels, size, size), generator=g, device=device)
    x_0 = ddpm_sample(ema, schedule, x_T, y, omega=omega, method=method, var_type=run.var_type, generator=g)
    return save_grid(x_0, path, nrow=per_class, upscale=max(1, 64 // size))


class Monitor:
    """The run's logs, progress, samples and evaluations; built by the Trainer from what they read.

    fast: the step's losses are device tensors (read only when shown: the loop's only host syncs).
    """

    def __init__(self, cfg, ctx: Context, device: torch.device, ema, schedule, data, amp: bool, fast: bool,
                 log: Callable[[str], None]):
        self.cfg, self.ctx, self.device, self.log = cfg, ctx, device, log
        self.ema, self.schedule, self.data, self.amp = ema, schedule, data, amp
        self.sync_device = fast and device.type == "cuda"
        self.logdir = Path(cfg.run.logdir)
        self.writer = NullWriter()
        self.bar = None
        self.evaluator: Optional[DuringTrainingEvaluator] = None
        self.img_per_s, self._tick, self._tick_step = 0.0, 0.0, 0

    # ------------------------------------------------------------------------------- a run
    def open(self, step: int) -> None:
        """The run starts at ``step``: rank 0 writes config.json, the evaluation is set up (a missing
        weights file stops the run here), TensorBoard and the progress bar open."""
        if self.ctx.is_main:
            (self.logdir / "samples").mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.logdir / "config.json")
        self.start_evaluation()
        if self.ctx.is_main:
            self.writer = summary_writer(self.logdir)
        from tqdm import tqdm
        shown = self.cfg.run.progress and self.ctx.is_main
        self.bar = tqdm(total=self.cfg.optim.steps, initial=step, disable=not shown, dynamic_ncols=True,
                        file=sys.stderr)
        self._tick, self._tick_step = time.perf_counter(), step

    def close(self) -> None:
        """The progress bar and TensorBoard close (again: a no-op)."""
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.writer = NullWriter()

    def report(self, step: int, out: dict, scheduler, check: Callable[[], None]) -> None:
        """After each step: the progress bar (rank 0 reads the losses about once a second and at the last
        step), and at every --log-every step TensorBoard train/* and, without a bar, a printed line.
        ``check`` runs when the losses were read (a host sync anyway), before they are shown; under data
        parallelism only at log steps, which every rank reaches together, so all stop at the same step."""
        run, total = self.cfg.run, self.cfg.optim.steps
        now = time.perf_counter()
        refresh = self.ctx.is_main and (now - self._tick > 1.0 or step == total)
        log_now = bool(run.log_every) and step % run.log_every == 0
        if refresh:
            if self.sync_device:  # img/s of finished steps, not queued ones
                torch.cuda.synchronize(self.device)
                now = time.perf_counter()
            self.img_per_s = (step - self._tick_step) * self.cfg.optim.batch_size / (now - self._tick)
            self._tick, self._tick_step = now, step
        if refresh or log_now:
            values = {k: float(v) for k, v in out.items()}
            if log_now or not self.ctx.enabled:
                check()
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", loss_ddpm=f"{values['loss_ddpm']:.4f}",
                                 loss_reg=f"{values['loss_reg']:.4f}", img_s=f"{self.img_per_s:.0f}", refresh=False)
        self.bar.update(1)
        if log_now:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/lr", float(scheduler.get_last_lr()[0]), step)
            self.writer.add_scalar("train/img_per_s", self.img_per_s, step)
            if not run.progress:
                self.log(f"step {step}/{total} loss {values['loss']:.5f} loss_ddpm {values['loss_ddpm']:.5f} "
                         f"loss_reg {values['loss_reg']:.5f} {self.img_per_s:.0f} img/s")

    def sample(self, step: int) -> Path:
        """Rank 0: the EMA sample grid <logdir>/samples/<step>.png."""
        return sample_grid(self.ema, self.schedule, self.cfg, self.data, self.device,
                           self.logdir / "samples" / f"{step:07d}.png")

    # ---------------------------------------------------------------------------- evaluation
    def start_evaluation(self) -> None:
        """--eval-every: rank 0 builds the feature network and the real reference features once, before
        the first step, so a missing weights file stops the run at its start; every rank stops alike."""
        if not self.cfg.run.eval_every or self.evaluator is not None:
            return
        error = None
        if self.ctx.is_main:
            try:
                self.evaluator = DuringTrainingEvaluator(self.cfg, self.ema, self.schedule, self.data, self.device,
                                                         self.amp, log=self.log)
            except (ValueError, OSError) as exc:
                error = exc
        if dist.any_true(error is not None):
            raise error or ValueError("--eval-every: rank 0 could not set up the evaluation (its message says why)")
        if self.evaluator is not None:
            self.log(f"evaluation every {self.cfg.run.eval_every} steps: {self.evaluator.describe()}")

    def evaluate(self, step: int) -> Optional[dict]:
        """Rank 0: score the EMA model now: TensorBoard eval/<name>, one printed line, one line of
        <logdir>/eval.jsonl (the other ranks wait for it in the loop's next collective). A failed
        evaluation is reported and training goes on."""
        if self.evaluator is None:
            return None
        ev, start = self.evaluator, time.perf_counter()
        try:
            metrics = ev.evaluate()
        except (ValueError, RuntimeError, OSError) as exc:  # a monitor must not end a long run
            print(f"warning: evaluation at step {step} failed: {exc}", file=sys.stderr, flush=True)
            return None
        seconds = time.perf_counter() - start
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()
        record = {"step": step, "num_samples": ev.num_samples, "sampler": ev.sampler, "steps": ev.steps,
                  "omega": ev.omega, "seconds": round(seconds, 3), **metrics}
        append_jsonl(self.logdir / JSONL_NAME, record)
        self.log(summary_line(step, metrics, seconds, ev.num_samples, ev.steps, ev.sampler))
        return metrics
