"""A training run from command-line options (``python -m cbdm_fast.train`` calls ``launch``): a new run
configured by the options, or a resumed one (--resume), which keeps its saved configuration except for
the RESUMABLE run-control options. The logdir is checked before anything is loaded: it must be a
writable folder, and one that holds another run is refused (training/run_folder.py, --start-over).

Options are {'section.name': value} for the config fields the command line set (FLAGS names the flag
of each field, so messages speak in flags).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .. import dist
from ..files import checkpoint as ckpt_io
from ..files.paths import check_input_file, check_output_folder
from ..interrupts import Interrupted, sigterm_interrupts
from .config import TrainConfig, apply_preset, validate
from .monitor import evaluation_problem
from .run_folder import check_new_run
from .run_folder import start_over as start_over_run
from .state import NotResumable, load_resumable
from .step import TrainingDiverged
from .trainer import Trainer, resume_trainer

# flag -> (config section, field, type); the type is what argparse converts to
FLAGS = {
    "--dataset": ("data", "dataset", str), "--data-root": ("data", "root", str),
    "--imb-factor": ("data", "imb_factor", float), "--imb-type": ("data", "imb_type", str),
    "--image-size": ("data", "image_size", int), "--data-on": ("data", "storage", str),
    "--ch": ("model", "ch", int), "--ch-mult": ("model", "ch_mult", int), "--attn": ("model", "attn", int),
    "--num-res-blocks": ("model", "num_res_blocks", int), "--dropout": ("model", "dropout", float),
    "--T": ("diffusion", "T", int), "--beta-1": ("diffusion", "beta_1", float),
    "--beta-T": ("diffusion", "beta_T", float),
    "--method": ("method", "method", str), "--tau": ("method", "tau", float), "--y-bal": ("method", "y_bal", str),
    "--label-drop": ("method", "label_drop", float), "--finetune-from": ("method", "finetune_from", str),
    "--steps": ("optim", "steps", int), "--batch-size": ("optim", "batch_size", int), "--lr": ("optim", "lr", float),
    "--warmup": ("optim", "warmup", int), "--grad-clip": ("optim", "grad_clip", float),
    "--ema-decay": ("optim", "ema_decay", float),
    "--logdir": ("run", "logdir", str), "--seed": ("run", "seed", int), "--device": ("run", "device", str),
    "--log-every": ("run", "log_every", int), "--sample-every": ("run", "sample_every", int),
    "--save-every": ("run", "save_every", int), "--keep-checkpoints": ("run", "keep_checkpoints", int),
    "--sample-per-class": ("run", "sample_per_class", int), "--sample-omega": ("run", "sample_omega", float),
    "--var-type": ("run", "var_type", str), "--threads": ("run", "threads", int),
    "--backend": ("run", "backend", str), "--precision": ("run", "precision", str),
    "--kernels": ("run", "kernels", str),
    "--eval-every": ("run", "eval_every", int), "--eval-samples": ("run", "eval_samples", int),
    "--eval-sampler": ("run", "eval_sampler", str), "--eval-steps": ("run", "eval_steps", int),
    "--inception-weights": ("run", "inception_weights", str),
}
# config fields set by switches (flags without a value), not in FLAGS
SWITCHES = {"data.hflip": "--hflip/--no-hflip", "data.augm": "--augm", "method.per_sample_drop": "--per-sample-drop",
            "run.progress": "--no-progress"}
# options a resumed run may change (run.kernels: the same math on other kernels); everything else must match
# the checkpoint
RESUMABLE = {"optim.steps", "run.device", "run.progress", "run.threads", "run.kernels", "run.log_every",
             "run.sample_every", "run.save_every", "run.keep_checkpoints", "run.sample_per_class",
             "run.sample_omega", "run.logdir", "data.storage", "run.eval_every", "run.eval_samples", "run.eval_sampler",
             "run.eval_steps",
             "run.inception_weights"}


class OptionError(ValueError):
    """An option's value is out of range, or a resumed run may not change it (the CLI shows its usage)."""


def flag_name(key: str) -> str:
    """'method.method' -> '--method'."""
    for flag, (section, name, _) in FLAGS.items():
        if f"{section}.{name}" == key:
            return flag
    return SWITCHES.get(key, key)


def config_from_options(options: dict) -> TrainConfig:
    """A new run's configuration: the defaults, the options, the digits preset where no option was
    given, and runs/<dataset>_<method> as the logdir; ValueError naming a flag when one is out of range."""
    cfg = TrainConfig()
    for key, value in options.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg = apply_preset(cfg, set(options))
    if "run.logdir" not in options:
        cfg.run.logdir = default_logdir(options)
    validate(cfg)
    return cfg


def fixed_option_conflicts(saved: dict, options: dict) -> list[str]:
    """The options a resumed run may not change (not RESUMABLE) whose value differs from the
    checkpoint's config ``saved``; repeating the original value is allowed, so one command line
    can start a run and later resume it (e.g. a requeued cluster job)."""
    cfg = TrainConfig.from_dict(saved)
    out = []
    for key, value in sorted(options.items()):
        section, name = key.split(".")
        old = getattr(getattr(cfg, section), name)
        if key not in RESUMABLE and old != value:
            out.append(f"{flag_name(key)} (the checkpoint has {old!r}, this command {value!r})")
    return out


def same_run(saved: dict, cfg: TrainConfig) -> bool:
    """Whether the config.json ``saved`` is of the run ``cfg`` describes: every option that a resumed run
    may not change (not RESUMABLE) has the same value."""
    try:
        old = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return False
    return all(old[section][name] == value for section, fields in cfg.to_dict().items()
               for name, value in fields.items() if f"{section}.{name}" not in RESUMABLE)


def default_logdir(options: dict) -> str:
    """The logdir of a run without --logdir: runs/<dataset>_<method>."""
    defaults = TrainConfig()
    return (f"runs/{options.get('data.dataset', defaults.data.dataset)}_"
            f"{options.get('method.method', defaults.method.method)}")


def resume_path(resume: str, logdir, say=print) -> Optional[Path]:
    """--resume CKPT: that file. --resume alone ('auto'): the newest checkpoint of ``logdir`` that verifies
    (newer ones that are corrupt are reported and skipped), or None when it has no checkpoint yet."""
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            names = [p.name for p in ckpt_io.find_checkpoints(path)]
            inside = f"; it holds {', '.join(names)}" if names else ", which holds no checkpoint"
            raise ckpt_io.CheckpointError(f"--resume {resume} is a folder{inside}: name a checkpoint, or give "
                                          f"--logdir {resume} --resume (alone) to continue its newest one")
        return path
    logdir = Path(logdir)
    if not ckpt_io.find_checkpoints(logdir):
        return None  # nothing to resume yet: the caller starts a new run
    path, skipped = ckpt_io.newest_good(logdir, log=lambda msg: say(msg, file=sys.stderr, flush=True))
    if path is None:
        raise ckpt_io.CheckpointError(f"--resume: none of the {len(skipped)} checkpoints in {logdir} is readable "
                                      f"(see the warnings above)")
    if skipped:
        say(f"falling back to {path.name}, the newest checkpoint that verifies", file=sys.stderr, flush=True)
    return path


def _load_resumed(path: Path) -> dict:
    """The checkpoint --resume names; when it is torn, corrupt or unreadable, the error names the newest
    good checkpoint beside it."""
    try:
        return load_resumable(path)
    except ckpt_io.CheckpointError as exc:
        if not path.is_file() or isinstance(exc, NotResumable):
            raise
        good, _ = ckpt_io.newest_good(path.parent)
        if good is None or good == path:
            raise
        raise type(exc)(f"{exc}; the newest checkpoint there that verifies is {good}: --resume {good} "
                        f"(or --resume alone)") from None


def _nothing_to_train(path: Path, step: int, steps: int, say) -> None:
    """A resumed run whose checkpoint is at or past --steps trains nothing and writes nothing: said,
    and an OptionError when --steps is below the checkpoint's step (--steps counts all of a run's steps)."""
    if step > steps:
        raise OptionError(f"--steps {steps}: {path} is already at step {step} (--steps is the run's total, not "
                          f"the steps to add): nothing was trained; pass --steps above {step} to train further")
    say(f"nothing to train: {path} is at step {step}, which is --steps {steps}; pass a larger --steps to train "
        f"further", flush=True)


def _build(options: dict, resume: Optional[str], start_over: bool, say) -> Optional[Trainer]:
    """The Trainer the options describe: resumed from a checkpoint, or new (None: a resumed run with
    nothing left to train). Checks the logdir before anything is loaded or written."""
    logdir = options.get("run.logdir", default_logdir(options))
    if start_over and resume is not None:
        raise OptionError("--start-over starts a new run; it cannot go with --resume")
    if resume in (None, "auto"):  # the folder written (a resumed CKPT's is checked below)
        check_output_folder(logdir, "--logdir")
    path = resume_path(resume, logdir, say) if resume is not None else None
    if path is None and resume is not None:
        say(f"--resume: no checkpoint in {logdir} yet; starting a new run", flush=True)
    if path is None:
        try:
            cfg = config_from_options(options)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        problem = evaluation_problem(cfg)
        if problem is not None:
            raise OptionError(problem)
        if cfg.method.finetune_from:  # before the data set is loaded
            check_input_file(cfg.method.finetune_from, "--finetune-from")
        if start_over and dist.from_env().is_main:
            start_over_run(logdir, say)
        elif not start_over:
            check_new_run(logdir, lambda saved: same_run(saved, cfg))
        return Trainer(cfg)
    state = _load_resumed(path)
    conflicts = fixed_option_conflicts(state["config"], options)
    if conflicts:
        raise OptionError(f"--resume continues a run with its saved configuration; these options cannot "
                          f"change: {'; '.join(conflicts)}")
    saved = TrainConfig.from_dict(state["config"])
    steps = options.get("optim.steps", saved.optim.steps)
    if int(state["step"]) >= steps:
        _nothing_to_train(path, int(state["step"]), steps, say)
        return None
    target = Path(options.get("run.logdir", saved.run.logdir))
    check_output_folder(target, "--logdir")
    if target.resolve() != path.parent.resolve():
        check_new_run(target, lambda config: same_run(config, saved), resumed_from=path)
    trainer = resume_trainer(path, overrides={k: v for k, v in options.items() if k in RESUMABLE}, state=state)
    validate(trainer.cfg)
    problem = evaluation_problem(trainer.cfg)
    if problem is not None:
        raise ValueError(problem)
    say(f"resuming {path} at step {trainer.step}", flush=True)
    return trainer


def launch(options: dict, resume: Optional[str] = None, start_over: bool = False) -> str:
    """Train as the command line says; returns Trainer.run's status ('done' or 'stopped'), or 'nothing'
    when a resumed run was already at --steps.

    resume: None (a new run), 'auto' (the newest good checkpoint of the logdir, or a new run when there is
    none) or a checkpoint path. start_over: a new run into a logdir that holds another run moves that run
    aside first (training/run_folder.py); without it such a logdir is refused. Raises OptionError for a
    bad or unchangeable option, RunFolderError, TrainingDiverged (naming the last good checkpoint),
    ValueError/OSError for bad data or checkpoints, or Interrupted (naming the newest checkpoint) on a
    second signal. Under torchrun rank 0 alone prints; the process group is left on return.
    """
    say = print if dist.from_env().is_main else (lambda *a, **k: None)
    trainer = None
    try:
        with sigterm_interrupts():  # while the run is built, SIGTERM stops it as Ctrl-C does (run() has its own)
            trainer = _build(options, resume, start_over, say)
            if trainer is None:
                return "nothing"
            say(trainer.describe(), flush=True)
            say(f"logdir: {trainer.cfg.run.logdir} (config.json, checkpoints, TensorBoard log, samples/)", flush=True)
            return trainer.run()
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc}; {_last_checkpoint(trainer)}", exc.step) from None
    except KeyboardInterrupt as exc:  # a second signal, or a signal before training started
        what = str(exc) if isinstance(exc, Interrupted) else "interrupted"
        where = _last_checkpoint(trainer) if trainer is not None else "nothing was trained"
        raise Interrupted(f"{what}; {where}") from None
    finally:
        dist.cleanup()


def _last_checkpoint(trainer: Optional[Trainer]) -> str:
    last = ckpt_io.find_checkpoints(trainer.cfg.run.logdir) if trainer is not None else []
    return f"the last checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
