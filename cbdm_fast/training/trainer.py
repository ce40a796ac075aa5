"""The training loop: the authors' algorithm (SPEC.md, Training), made resumable and safe.

One step, as in the authors' code: draw t, noise, the label drop and y_bal; loss = loss_ddpm +
loss_reg; backward; clip the gradient norm; Adam; warm-up scheduler; EMA of every weight.
Checkpoints hold everything needed to continue bit-exactly (RNG states and the data stream too).

Backends (cfg.run.backend): ``eager`` is that step exactly as the authors run it (step.eager_step: fp32,
two forwards, host randomness, a host sync per step for the finite-loss check). ``fused`` and
``compiled`` run the same algorithm through ``fast_step.FastStep``: one 2B forward, every draw on the
device (the device's default generator, saved in checkpoints), fused Adam, foreach clip and EMA, bf16
autocast unless --precision fp32, channels_last on CUDA, on our kernels or torch's (--kernels,
config.resolve_kernels); ``compiled`` adds torch.compile and, on CUDA, one CUDA graph per step.
Their losses stay on the device: the loop reads them (one sync) only at log points, and checks that
every loss so far was finite there and before each checkpoint, so a NaN stops the run naming its step
and no checkpoint is written from diverged weights.

Under torchrun (WORLD_SIZE > 1) every backend runs data-parallel with DistributedDataParallel, the
same algorithm on the global batch split across ranks; training/ddp.py explains how the data, the
random draws, checkpoints, RNG states and stops are kept exact and in step. training/monitor.py
shows and records the run (progress, TensorBoard, sample grids, evaluation during training).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dist
from ..data import BatchStream, load_dataset
from ..data.ada import ada_augment
from ..dist import resolve_device
from ..model import UNet, count_parameters
from ..schedule import Schedule
from . import ddp
from .config import AUTO, TrainConfig, resolve_backend, resolve_kernels
from .draws import step_draws
from .fast_step import FastStep
from .monitor import Monitor, describe_run, log_line, silent
from .state import (load_finetune_weights, load_resumable, load_rng_state, load_training_state, rng_state,
                    save_checkpoint, training_state)
from .step import StepConfig, eager_step, make_optimizer, prepare_model, warmup_factor
from .stop import StopSignals


def resolve_storage(storage: str, nbytes: int, device: torch.device) -> str:
    """--data-on auto: the device when the uint8 data set takes under a quarter of its free memory
    (batches then cost no host work or copies), else host memory with pinned, asynchronous copies.
    On a CPU both are the same memory: device."""
    if storage != AUTO:
        return storage
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes < free / 4 else "host"


class Trainer:
    """Holds model, EMA, optimiser, scheduler, data stream and RNG; ``run`` trains to cfg.optim.steps."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = log_line, load_pretrained: bool = True):
        # Initialize: under torchrun join the process group (cuda -> cuda:LOCAL_RANK); else a no-op
        self.cfg = cfg
        self.dist, self.device = dist.setup(resolve_device(cfg.run.device), batch_size=cfg.optim.batch_size)
        self.log = log if self.dist.is_main else silent  # rank 0 logs for everyone
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)

        # Load dataset
        d = cfg.data
        self.data = load_dataset(d.dataset, root=d.root, imb_factor=d.imb_factor, imb_type=d.imb_type,
                                 image_size=d.image_size)
        _, self.image_size, _, self.in_ch = self.data.images.shape
        self.num_class = self.data.num_classes
        counts = self.data.counts()
        self.class_freq = torch.as_tensor(counts, dtype=torch.float64) / counts.sum()
        y_bal = cfg.method.y_bal
        if y_bal == AUTO:
            y_bal = "uniform" if cfg.method.finetune_from else "train"
        self.y_bal_probs = (torch.full((self.num_class,), 1.0 / self.num_class, dtype=torch.float64)
                            if y_bal == "uniform" else self.class_freq)

        # Construct network: the UNet (fine-tuning: from a checkpoint's EMA), its EMA, optimizer, scheduler
        m = cfg.model
        self.unet_kwargs = dict(T=cfg.diffusion.T, ch=m.ch, ch_mult=list(m.ch_mult), attn=list(m.attn),
                                num_res_blocks=m.num_res_blocks, dropout=m.dropout,
                                cond=cfg.method.method != "uncond", augm=bool(d.augm),
                                num_class=self.num_class, in_ch=self.in_ch)
        self.model = UNet(**self.unet_kwargs).to(self.device)
        if cfg.method.finetune_from and load_pretrained:  # fine-tuning starts from the EMA weights, as the authors'
            load_finetune_weights(self.model, cfg.method.finetune_from, self.unet_kwargs)
        self.backend, self.amp = resolve_backend(cfg.run.backend, cfg.run.precision, self.device.type)
        self.channels_last = self.backend != "eager" and self.device.type == "cuda"
        # the fast step's kernels, and why (the run's header says both); the eager step runs torch's
        self.kernels, self.kernels_why = (("inductor", "") if self.backend == "eager" else
                                          resolve_kernels(cfg.run.kernels, self.backend, self.device.type))
        self.step_cfg = StepConfig.from_train_config(cfg, amp=self.amp, channels_last=self.channels_last,
                                                     kernels=self.kernels)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.backend == "eager":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr)
        else:
            prepare_model(self.model, self.channels_last)
            prepare_model(self.ema, self.channels_last)
            self.optimizer = make_optimizer(self.model.parameters(), cfg.optim.lr, self.device,
                                            capturable=(self.backend == "compiled" and self.device.type == "cuda"
                                                        and not self.dist.enabled))  # no CUDA graph under DDP
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_factor(cfg.optim.warmup))
        self.schedule = Schedule(cfg.diffusion.T, cfg.diffusion.beta_1, cfg.diffusion.beta_T, device=self.device)

        # Batches and draws: the global batch's permutation on every rank, this rank's slice of each batch;
        # ADA draws its own x-flip (its first parameter), as the authors' pipeline replaces RandomHorizontalFlip
        hflip = False if d.augm else (d.hflip if d.hflip is not None else d.dataset != "digits")
        self.storage = resolve_storage(d.storage, self.data.images.nbytes, self.device)  # after the model: free memory
        self.stream = BatchStream(self.data, cfg.optim.batch_size, hflip=hflip, seed=cfg.run.seed, device=self.device,
                                  rank=self.dist.rank, world_size=self.dist.world_size, storage=self.storage)
        # the draws continue the default generators from here (data parallel: clones of them; ddp.py)
        self.generators = ddp.draw_generators(self.dist, self.device, cfg.run.seed)
        # data parallel: the DDP module the step's forward (and its gradients' all-reduce) goes through
        self._wrapped = (ddp.wrap_step(self.model, self.schedule, self.device, self.step_cfg,
                                       eager=self.backend == "eager") if self.dist.enabled else None)
        self._step_fn: Optional[Callable] = None  # built at the first step (_build_step)
        self._fast: Optional[FastStep] = None
        self.step = 0
        self.monitor = Monitor(cfg, self.dist, self.device, self.ema, self.schedule, self.data, self.amp,
                               fast=self.backend != "eager", log=self.log)
        self.stop = StopSignals(self.dist, self.log)

    def describe(self) -> str:
        """What runs: data, model, step (and data parallelism), as the CLI prints it before training."""
        return describe_run(self.cfg, self.data, self.storage, count_parameters(self.model), self.device, self.dist,
                            self.backend, self.amp, self.channels_last, self.kernels, self.kernels_why)

    # ------------------------------------------------------------------------------- one step
    def _next_batch(self):
        """(x_0, y, augm): the next batch (y None for an unconditional model), ADA-augmented on the device
        when --augm (its draws for the global batch from the data stream's generator, which checkpoints
        save; this rank's rows), else augm None."""
        x_0, y = self.stream.next()
        y = None if self.cfg.method.method == "uncond" else y
        if not self.cfg.data.augm:
            return x_0, y, None
        x_0, augm = ada_augment(x_0, generator=self.stream.generator, global_batch=self.stream.batch_size,
                                part=ddp.rank_slice(self.dist, x_0.shape[0]))
        return x_0, y, augm

    def _build_step(self) -> Callable:
        """(x_0, y, augm) -> loss terms: the eager step, or the FastStep (built here, at the first step, so
        that a resumed run's FastStep names steps from where it resumed)."""
        m, eager, cfg = self.cfg.method, self.backend == "eager", self.step_cfg
        host, on_device = self.generators
        draw = step_draws(m.method, m.label_drop, m.per_sample_drop, self.y_bal_probs, self.schedule.T, self.device,
                          on_host=eager, generator=on_device, host_generator=host)
        draw = ddp.rank_draws(draw, self.dist)  # data parallel: the global batch's draws, this rank's slice
        reduce = dist.all_reduce_mean if self.dist.enabled else None  # the logged losses: means over ranks
        if eager:
            def step(x_0, y, augm):
                return eager_step(self.model, self.ema, self.optimizer, self.schedule, x_0, y, draw(x_0), cfg,
                                  augm=augm, loss=self._wrapped, reduce=reduce, step=self.step + 1)
            return step
        self._fast = FastStep(self.model, self.ema, self.optimizer, self.schedule, cfg, draw, loss=self._wrapped,
                              reduce=reduce, backend=self.backend, cuda_graph=False if self.dist.enabled else None,
                              first_step=self.step)
        return self._fast

    def step_once(self) -> dict:
        """One optimisation step; returns its loss terms as tensors (fast backends: on the device, no sync)."""
        if self._step_fn is None:
            self._step_fn = self._build_step()
        out = self._step_fn(*self._next_batch())
        self.scheduler.step()
        self.step += 1
        return out

    def train_step(self) -> dict:
        """One optimisation step; returns the loss terms as floats (a host sync on every backend)."""
        values = {k: float(v) for k, v in self.step_once().items()}
        self.check_finite()
        return values

    def check_finite(self) -> None:
        """Fast backends: raise TrainingDiverged if any loss so far was NaN or infinite (one sync); the
        eager step checks its own loss before its update."""
        if self._fast is not None:
            self._fast.check_finite()

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue; under data parallelism a collective (call on every rank)."""
        rng = rng_state(self.dist, self.device, *self.generators)
        return training_state(self.step, self.cfg, self.unet_kwargs, self.image_size, self.model, self.ema,
                              self.optimizer, self.scheduler, rng, self.stream)

    def load_state_dict(self, checkpoint: dict) -> None:
        step = load_training_state(checkpoint, self.model, self.ema, self.optimizer, self.scheduler, self.stream)
        load_rng_state(checkpoint["rng"], self.dist, self.device, *self.generators, seed=self.cfg.run.seed, step=step,
                       log=self.log)
        self.step = step

    def save_checkpoint(self) -> Path:
        """Write ckpt_<step>.pt (never from diverged weights); under data parallelism call on every rank."""
        self.check_finite()
        return save_checkpoint(self.state_dict(), self.cfg.run.logdir, self.cfg.run.keep_checkpoints,
                               self.dist.is_main, log=self.log)

    # ---------------------------------------------------------------------------------- loop
    def run(self) -> str:
        """Train until cfg.optim.steps. Returns 'done', or 'stopped' when a signal stopped the run before
        its last step (a checkpoint of the step it stopped at is saved; training/stop.py).

        Raises TrainingDiverged on a NaN/inf loss, leaving the last good checkpoint as it was;
        Interrupted on a second signal.
        """
        run, steps, monitor, stop = self.cfg.run, self.cfg.optim.steps, self.monitor, self.stop
        try:
            monitor.open(self.step)
            with stop.installed():
                # Train
                while self.step < steps:
                    out = self.step_once()
                    monitor.report(self.step, out, self.scheduler, self.check_finite)
                    if stop.requested():
                        break
                    if run.eval_every and self.step % run.eval_every == 0:
                        # before the checkpoint: a run killed while evaluating redoes this evaluation on resume;
                        # the other ranks wait for rank 0 in the collective that follows
                        if self.dist.is_main:
                            stop.abandon("the evaluation", monitor.evaluate, self.step)
                        if stop.requested():
                            break
                    if run.save_every and self.step % run.save_every == 0:
                        self.save_checkpoint()
                    if run.sample_every and self.step % run.sample_every == 0 and self.step < steps:
                        if self.dist.is_main:
                            stop.abandon("the sample grid", monitor.sample, self.step)
                        if stop.requested():  # a signal during the grid: stop at this step, not the next
                            break
                monitor.close()  # before the last lines are printed
                path = self.save_checkpoint()
                if self.step < steps:
                    launcher = (f"torchrun --nproc_per_node {self.dist.world_size} -m cbdm_fast.train"
                                if self.dist.enabled else "python -m cbdm_fast.train")
                    self.log(f"stopped at step {self.step} of {steps}; checkpoint {path}. "
                             f"Continue with: {launcher} --resume {path}")
                    return "stopped"
                self.log(f"trained {self.step} steps; checkpoint {path}")
                if self.dist.is_main:
                    grid = stop.abandon("the final sample grid", monitor.sample, self.step,
                                        after=f"the checkpoint {path} is saved")
                    self.log(f"EMA samples (one row per class, head first): {grid}" if grid is not None else
                             f"the final sample grid was skipped ({stop.name} received); training is complete")
                return "done"
        finally:
            monitor.close()


def resume_trainer(path, overrides: Optional[dict] = None, log=log_line, state: Optional[dict] = None) -> Trainer:
    """A Trainer restored from one of our checkpoints; ``overrides`` ('section.name': value) may change
    run-control options. ``state``: the checkpoint already loaded from ``path`` by ``state.load_resumable``
    (saves reading it twice)."""
    # Resume: a Trainer built from the checkpoint's config, then its state loaded
    state = load_resumable(path) if state is None else state
    cfg = TrainConfig.from_dict(state["config"])
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    trainer = Trainer(cfg, log=log, load_pretrained=False)  # the weights come from the checkpoint
    trainer.load_state_dict(state)
    return trainer
