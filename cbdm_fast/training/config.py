"""Training configuration: dataclasses saved next to the results (config.json) and in checkpoints.

Defaults are the CBDM authors' (SPEC.md). The built-in digits data set comes with a preset small
UNet and demo-length optimisation settings so the demo finishes in minutes on 2 CPU cores; every
preset value is printed in the resolved configuration and can be overridden by a flag.

The vocabularies of the training options are defined here once (Literal types and their tuples);
everything else imports them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, get_args

from ..data.longtail import IMB_TYPES
from ..dist import resolve_device
from ..schedule import VAR_TYPES

Method = Literal["uncond", "ddpm", "cfg", "cbdm"]  # ddpm: conditional; cfg adds the label drop; cbdm the regulariser
Backend = Literal["eager", "fused", "compiled"]     # the training step (cbdm_fast/training/step.py, fast_step.py)
Precision = Literal["fp32", "bf16"]                 # bf16: autocast of the fast step's forward, fp32 master weights
Kernels = Literal["fused", "inductor"]              # the fast step's kernels: ours (cbdm_fast.ops) or torch's formulas
METHODS: tuple[str, ...] = get_args(Method)
GUIDED_METHODS = ("cfg", "cbdm")  # trained with the label drop: they learn eps_u too and sample with CFG
BACKENDS: tuple[str, ...] = get_args(Backend)
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "eager")  # the backends FastStep runs
PRECISIONS: tuple[str, ...] = get_args(Precision)
KERNELS: tuple[str, ...] = get_args(Kernels)
AUTO = "auto"  # an option chosen for the device or the run (resolve_backend, the trainer)
BACKEND_OPTIONS = (AUTO, *BACKENDS)
PRECISION_OPTIONS = (AUTO, *PRECISIONS)
KERNEL_OPTIONS = (AUTO, *KERNELS)
Y_BAL = (AUTO, "train", "uniform")  # auto: uniform when fine-tuning, else the training frequencies
STORAGES = (AUTO, "device", "host")  # --data-on: auto keeps the data on the device when it fits
EVAL_SAMPLERS = ("ddim", "dpm++2m")  # --eval-sampler: deterministic few-step samplers (samplers.SAMPLERS less ddpm)
# --eval-steps when not given, per sampler: DDIM keeps its 50 from before DPM-Solver++ was the default
EVAL_STEPS = {"ddim": 50, "dpm++2m": 20}


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: Optional[str] = None
    imb_factor: Optional[float] = None   # None: the data set's default (0.1 digits, 0.01 CIFAR-LT)
    imb_type: str = "exp"
    image_size: Optional[int] = None     # None: native (16 digits, 32 CIFAR)
    hflip: Optional[bool] = None         # None: on, except for digits (a mirrored digit is not a digit)
    augm: bool = False                   # ADA (the authors' --augm): Karras pipeline, p = 0.12
    storage: str = AUTO                  # where the uint8 images live: STORAGES


@dataclass
class ModelConfig:
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 2, 2])
    attn: list = field(default_factory=lambda: [1])
    num_res_blocks: int = 2
    dropout: float = 0.1


@dataclass
class DiffusionConfig:
    T: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 0.02


@dataclass
class MethodConfig:
    method: str = "cbdm"                 # METHODS
    tau: float = 1.0
    y_bal: str = AUTO                    # Y_BAL
    label_drop: float = 0.1              # probability of the whole-batch label drop (cfg, cbdm)
    per_sample_drop: bool = False        # drop labels per sample instead (not the authors' default)
    finetune_from: Optional[str] = None  # our or the authors' checkpoint; its EMA weights start training


@dataclass
class OptimConfig:
    steps: int = 300_000
    batch_size: int = 48
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999


@dataclass
class RunConfig:
    logdir: str = "runs/cbdm"
    seed: int = 0
    device: str = AUTO
    log_every: int = 10
    sample_every: int = 0                # 0: only at the end
    save_every: int = 5000
    keep_checkpoints: int = 2
    sample_per_class: int = 8
    sample_omega: float = 1.6            # the authors' CBDM guidance strength
    var_type: str = "fixedlarge"
    progress: bool = True
    threads: Optional[int] = None        # CPU threads for torch; None: torch's default
    backend: str = AUTO                  # BACKEND_OPTIONS (see cbdm_fast/training/trainer.py)
    precision: str = AUTO                # PRECISION_OPTIONS (bf16: autocast, fp32 master weights)
    kernels: str = AUTO                  # KERNEL_OPTIONS (resolve_kernels); a resumed run may change it
    # evaluation during training (cbdm_fast/training/monitor.py, cbdm_fast/training/evaluator.py)
    eval_every: int = 0                  # 0: off; else score EMA samples every N steps (rank 0)
    eval_samples: Optional[int] = None   # None: 10 per class; else rounded up to a whole number per class
    # DPM-Solver++(2M), 20 steps (logSNR grid): on digits-LT its images are as close to the converged ODE
    # solution as DDIM-100's, at a fifth of the model evaluations (bench/results/sampler_study_pc50.md)
    eval_sampler: str = "dpm++2m"        # EVAL_SAMPLERS: the sampler of those samples (guidance: sample_omega)
    eval_steps: Optional[int] = None     # its steps; None: EVAL_STEPS of the sampler (eval_steps_of)
    inception_weights: Optional[str] = None  # FID Inception weights, needed by eval_every off digits


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub_cls = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig,
                       "method": MethodConfig, "optim": OptimConfig, "run": RunConfig}[f.name]
            values = d.get(f.name, {})
            known = {x.name for x in dataclasses.fields(sub_cls)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {f.name} option(s) in config: {sorted(unknown)}")
            kwargs[f.name] = sub_cls(**values)
        return cls(**kwargs)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def resolve_backend(backend: str, precision: str, device_type: str) -> tuple[str, bool]:
    """(backend, bf16 autocast) for the configured names on a device type: auto is compiled on CUDA, fused
    on CPU (on a CPU, compilation costs minutes up front for a small gain at these sizes; bench/RESULTS.md)."""
    if backend == AUTO:
        backend = "compiled" if device_type == "cuda" else "fused"
    if backend == "eager":
        if precision == "bf16":
            raise ValueError("--precision bf16 needs --backend fused or compiled (eager is the authors' fp32 step)")
        return backend, False
    return backend, precision in (AUTO, "bf16")


# --kernels auto: per device type and fast backend, the kernels that the recorded measurements showed
# fastest (bench/RESULTS.md), and why. Remeasure with bench/run_gpu_checks.sh's `kernels` stage
# (bench train --backends compiled_bf16 --kernels fused,inductor) and change the entry it contradicts.
_ON_CPU = ("on a CPU the Triton kernels run only in their interpreter, so fused would mean the ops' torch "
           "reference paths: nothing to gain")
AUTO_KERNELS = {
    ("cuda", "compiled"): ("inductor", "the only kernels the compiled step has been measured with on a GPU "
                                       "(bench/RESULTS.md: 6.82x eager at batch 48 on an H200)"),
    ("cuda", "fused"): ("fused", "the uncompiled step was measured on a GPU only with the Triton GroupNorm/attention "
                                 "(bench/RESULTS.md: 1.48x eager at batch 48 on an H200)"),
    ("cpu", "compiled"): ("inductor", _ON_CPU),
    ("cpu", "fused"): ("inductor", _ON_CPU),
}
_UNMEASURED = ("inductor", "torch's own kernels: ours were never measured on this device type")


def resolve_kernels(kernels: str, backend: str, device_type: str) -> tuple[str, str]:
    """(kernels, why) of a fast backend ("fused" or "compiled") on a device type: an explicit choice
    stands; auto looks up AUTO_KERNELS. fused: the step's q_sample, loss and the model's GroupNorm(+SiLU,
    +time-embedding add) and attention run through cbdm_fast.ops (nn.patch_model); inductor: the torch
    formulas (schedule.q_sample, losses.cbdm_terms, the unpatched model), which torch.compile's inductor
    turns into its own kernels in the compiled step. Neither changes the algorithm."""
    if kernels != AUTO:
        return kernels, "chosen with --kernels"
    choice, why = AUTO_KERNELS.get((device_type, backend), _UNMEASURED)
    return choice, f"auto -> {choice}: {why}"


# Demo preset for the built-in digits: a 16x16, 1-channel UNet of 1.1M parameters and optimiser settings
# for a run of a thousand steps (about 6 minutes on 2 CPU cores, sampling included; the authors' EMA decay
# and warm-up assume 300k steps).
DIGITS_PRESET = {
    "model": dict(ch=32, ch_mult=[1, 2, 2], attn=[1], num_res_blocks=1, dropout=0.0),
    "optim": dict(steps=1000, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995),
    "run": dict(sample_every=0, save_every=250, sample_omega=1.0, log_every=10, sample_per_class=6),
}


def apply_preset(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill the digits preset into every option the user did not set (``explicit`` = 'section.name')."""
    if cfg.data.dataset != "digits":
        return cfg
    for section, values in DIGITS_PRESET.items():
        sub = getattr(cfg, section)
        for name, value in values.items():
            if f"{section}.{name}" not in explicit:
                setattr(sub, name, value)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks with messages that name the flag; every float must be finite too."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    def finite(value, low, flag, strict=False):  # a finite number >= low (> low when strict)
        ok = math.isfinite(value) and (value > low if strict else value >= low)
        need(ok, f"{flag} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")

    o, m, r, d = cfg.optim, cfg.method, cfg.run, cfg.data
    need(o.steps >= 0, f"--steps must be >= 0, got {o.steps}")
    need(o.batch_size >= 1, f"--batch-size must be >= 1, got {o.batch_size}")
    finite(o.lr, 0, "--lr", strict=True)
    need(o.warmup >= 0, f"--warmup must be >= 0, got {o.warmup}")
    finite(o.grad_clip, 0, "--grad-clip", strict=True)
    need(0.0 <= o.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {o.ema_decay}")
    need(m.method in METHODS, f"--method must be one of {METHODS}, got {m.method!r}")
    need(m.y_bal in Y_BAL, f"--y-bal must be one of {Y_BAL}, got {m.y_bal!r}")
    finite(m.tau, 0, "--tau")
    need(0.0 <= m.label_drop < 1.0, f"--label-drop must be in [0, 1), got {m.label_drop}")
    need(d.imb_factor is None or 0.0 < d.imb_factor <= 1.0,
         f"--imb-factor must be in (0, 1], got {d.imb_factor}")
    need(not (d.augm and d.hflip), "--augm draws its own horizontal flips: leave out --hflip")
    need(d.storage in STORAGES, f"--data-on must be one of {', '.join(STORAGES)}, got {d.storage!r}")
    need(d.imb_type in IMB_TYPES,
         f"--imb-type must be {', '.join(IMB_TYPES[:-1])} or {IMB_TYPES[-1]}, got {d.imb_type!r}")
    need(d.image_size is None or d.image_size >= 4, f"--image-size must be >= 4, got {d.image_size}")
    validate_model(cfg, need)
    for flag, value in (("--log-every", r.log_every), ("--sample-every", r.sample_every),
                        ("--save-every", r.save_every)):
        need(value >= 0, f"{flag} must be >= 0, got {value}")
    need(0 <= r.seed < 2 ** 63, f"--seed must be in [0, 2^63), got {r.seed}")
    need(r.sample_per_class >= 1, f"--sample-per-class must be >= 1, got {r.sample_per_class}")
    finite(r.sample_omega, 0, "--sample-omega")
    need(r.threads is None or r.threads >= 1, f"--threads must be >= 1, got {r.threads}")
    try:
        resolve_device(r.device)
    except ValueError as exc:
        need(False, str(exc))
    need(r.backend in BACKEND_OPTIONS, f"--backend must be one of {', '.join(BACKEND_OPTIONS)}, got {r.backend!r}")
    need(r.precision in PRECISION_OPTIONS,
         f"--precision must be one of {', '.join(PRECISION_OPTIONS)}, got {r.precision!r}")
    need(not (r.backend == "eager" and r.precision == "bf16"),
         "--precision bf16 needs --backend fused or compiled (eager is the authors' fp32 step)")
    need(r.kernels in KERNEL_OPTIONS, f"--kernels must be one of {', '.join(KERNEL_OPTIONS)}, got {r.kernels!r}")
    need(not (r.backend == "eager" and r.kernels == "fused"),
         "--kernels fused needs --backend fused or compiled (eager is the authors' step on torch's kernels)")
    need(r.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {r.keep_checkpoints}")
    need(r.var_type in VAR_TYPES, f"--var-type must be {' or '.join(VAR_TYPES)}")
    validate_eval(cfg, need)


def validate_model(cfg: TrainConfig, need) -> None:
    """The UNet and its noise schedule: what the model and Schedule would refuse, named by flag."""
    model, diffusion, size = cfg.model, cfg.diffusion, cfg.data.image_size
    need(model.ch > 0 and model.ch % 32 == 0, f"--ch must be a positive multiple of 32, got {model.ch}")
    need(len(model.ch_mult) >= 1 and all(c >= 1 for c in model.ch_mult),
         f"--ch-mult must be one or more integers >= 1, got {list(model.ch_mult)}")
    need(all(0 <= a < len(model.ch_mult) for a in model.attn),
         f"--attn levels must be in 0..{len(model.ch_mult) - 1} (one per --ch-mult value), got {list(model.attn)}")
    need(model.num_res_blocks >= 1, f"--num-res-blocks must be >= 1, got {model.num_res_blocks}")
    need(0.0 <= model.dropout < 1.0, f"--dropout must be in [0, 1), got {model.dropout}")
    down = 2 ** (len(model.ch_mult) - 1)  # the UNet halves the size once per level after the first
    need(size is None or size % down == 0,
         f"--image-size must be a multiple of {down} (the UNet downsamples {len(model.ch_mult) - 1} times), got {size}")
    need(diffusion.T >= 2, f"--T must be >= 2, got {diffusion.T}")
    need(0 < diffusion.beta_1 <= diffusion.beta_T < 1, f"--beta-1 and --beta-T must satisfy 0 < --beta-1 <= "
                                                       f"--beta-T < 1, got {diffusion.beta_1} and {diffusion.beta_T}")


def eval_steps_of(run: RunConfig) -> int:
    """The evaluation sampler's steps: --eval-steps, else the sampler's default (EVAL_STEPS)."""
    return run.eval_steps if run.eval_steps is not None else EVAL_STEPS[run.eval_sampler]


def validate_eval(cfg: TrainConfig, need) -> None:
    """--eval-every / --eval-samples / --eval-sampler / --eval-steps. Whether a feature network is at hand is the
    monitor's question (training/monitor.py, evaluation_problem), asked before a run starts."""
    r = cfg.run
    need(r.eval_every >= 0, f"--eval-every must be >= 0 (0: off), got {r.eval_every}")
    need(r.eval_samples is None or r.eval_samples >= 1, f"--eval-samples must be >= 1, got {r.eval_samples}")
    need(r.eval_sampler in EVAL_SAMPLERS, f"--eval-sampler must be one of {', '.join(EVAL_SAMPLERS)}, "
                                          f"got {r.eval_sampler}")
    need(r.eval_steps is None or r.eval_steps >= 1, f"--eval-steps must be >= 1, got {r.eval_steps}")
    steps = eval_steps_of(r)
    most = cfg.diffusion.T - (r.eval_sampler == "dpm++2m")  # DPM-Solver++'s grid: M + 1 distinct timesteps
    need(not r.eval_every or steps <= most,
         f"--eval-steps must be <= {'--T - 1' if most < cfg.diffusion.T else '--T'} ({most}) with --eval-every "
         f"and --eval-sampler {r.eval_sampler}, got {steps}"
         + ("" if r.eval_steps is not None else f" (the {r.eval_sampler} default; pass --eval-steps)"))
