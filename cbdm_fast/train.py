"""python -m cbdm_fast.train: train DDPM, CFG or CBDM on a (long-tailed) image data set.

With no flags it trains CBDM on the built-in long-tailed digits (a demo of a few minutes on a CPU).
Data parallel on N GPUs (or CPU processes): torchrun --standalone --nproc_per_node N -m cbdm_fast.train ...
with --batch-size the global batch (see cbdm_fast/distributed.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .files import checkpoint as ckpt_io
from .config import BACKENDS, METHODS, PRECISIONS, STORAGES, Y_BAL, TrainConfig, apply_preset, validate
from .data import DATASETS

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
    "--eval-every": ("run", "eval_every", int), "--eval-samples": ("run", "eval_samples", int),
    "--eval-steps": ("run", "eval_steps", int), "--inception-weights": ("run", "inception_weights", str),
}
# options a resumed run may change; everything else must match the checkpoint
RESUMABLE = {"optim.steps", "run.device", "run.progress", "run.threads", "run.log_every",
             "run.sample_every", "run.save_every", "run.keep_checkpoints", "run.sample_per_class",
             "run.sample_omega", "run.logdir", "data.storage", "run.eval_every", "run.eval_samples", "run.eval_steps",
             "run.inception_weights"}

GROUPS = [
    ("data", "which images (default: the built-in long-tailed digits)",
     [("--dataset", dict(choices=DATASETS, help="data set (default digits)")),
      ("--data-root", dict(help="CIFAR archive or its folder; image folder root for folder/folderlt")),
      ("--imb-factor", dict(help="tail/head ratio in (0, 1] (default 0.1 digits, 0.01 CIFAR-LT)")),
      ("--imb-type", dict(choices=("exp", "step", "none"), help="long-tail profile (default exp)")),
      ("--image-size", dict(help="resize images to this size (default: native)")),
      ("--data-on", dict(choices=STORAGES, help="where the uint8 images live: device (GPU memory, no copies), "
                                                "host (pinned batches copied per step, for data sets too big "
                                                "for the GPU); auto: device when the data set takes under a "
                                                "quarter of the free GPU memory (default auto)"))]),
    ("model", "UNet (defaults: the authors' 35.9M UNet; digits: a 1.1M preset)",
     [("--ch", dict(help="base channels, a multiple of 32 (default 128)")),
      ("--ch-mult", dict(nargs="+", help="channel multiplier per level (default 1 2 2 2)")),
      ("--attn", dict(nargs="*", help="levels with attention (default 1)")),
      ("--num-res-blocks", dict(help="ResBlocks per level (default 2)")),
      ("--dropout", dict(help="dropout rate (default 0.1)"))]),
    ("diffusion", "noise schedule", [("--T", dict(help="diffusion steps (default 1000)")),
                                     ("--beta-1", dict(help="first beta (default 1e-4)")),
                                     ("--beta-T", dict(help="last beta (default 0.02)"))]),
    ("method", "what is trained",
     [("--method", dict(choices=METHODS, help="uncond | ddpm (conditional) | cfg | cbdm (default cbdm)")),
      ("--tau", dict(help="CBDM regulariser weight tau (default 1.0)")),
      ("--y-bal", dict(choices=Y_BAL, help="target label distribution: train frequencies, uniform, or auto "
                                           "(uniform when fine-tuning; default auto)")),
      ("--label-drop", dict(help="label-drop probability for cfg/cbdm (default 0.1)")),
      ("--finetune-from", dict(metavar="CKPT", help="start from this checkpoint's EMA weights (ours or the "
                                                    "authors' ckpt_*.pt)"))]),
    ("optimisation", "Adam with warm-up, clipping and EMA (the authors' defaults)",
     [("--steps", dict(help="training steps (default 300000; digits 1000)")),
      ("--batch-size", dict(help="batch size; under torchrun the global batch, split over the ranks "
                                 "(default 48; digits 32)")),
      ("--lr", dict(help="learning rate (default 2e-4; digits 2e-3)")), ("--warmup", dict(help="warm-up steps (default 5000; digits 100)")),
      ("--grad-clip", dict(help="gradient-norm clip (default 1.0)")),
      ("--ema-decay", dict(help="EMA decay (default 0.9999; digits 0.995)"))]),
    ("run", "logging, checkpoints and samples",
     [("--logdir", dict(help="results folder (default runs/<dataset>_<method>)")),
      ("--seed", dict(help="random seed (default 0)")),
      ("--device", dict(help="auto | cpu | cuda | cuda:N (default auto)")),
      ("--log-every", dict(help="TensorBoard scalars every N steps (default 10)")),
      ("--sample-every", dict(help="EMA sample grid every N steps; 0: at the end only (default 0)")),
      ("--save-every", dict(help="checkpoint every N steps (default 5000; digits 250)")),
      ("--keep-checkpoints", dict(help="checkpoints kept in the logdir (default 2)")),
      ("--sample-per-class", dict(help="images per class in sample grids (default 8; digits 6)")),
      ("--sample-omega", dict(help="guidance strength of the sample grids (default 1.6; digits 1.0)")),
      ("--var-type", dict(choices=("fixedlarge", "fixedsmall"), help="sampling variance (default fixedlarge)")),
      ("--threads", dict(help="CPU threads for torch (default: torch's); 1 helps on a busy small machine")),
      ("--backend", dict(choices=BACKENDS, help="training step: eager (the authors' step, the reference), fused "
                                                "(one 2B forward, device draws, fused optimizer), compiled (fused "
                                                "under torch.compile; one CUDA graph per step on a GPU); auto: "
                                                "compiled on CUDA, fused on CPU (default auto)")),
      ("--precision", dict(choices=PRECISIONS, help="fused/compiled: bf16 autocast with fp32 master weights, or fp32; "
                                                    "auto: bf16 (eager is always fp32)"))]),
    ("evaluation during training", "rank 0 scores EMA samples with python -m cbdm_fast.evaluate's metrics; "
     "TensorBoard eval/<metric> and <logdir>/eval.jsonl",
     [("--eval-every", dict(metavar="N", help="evaluate every N steps; 0: off (default 0)")),
      ("--eval-samples", dict(metavar="M", help="class-balanced samples per evaluation, rounded up to a whole "
                                                "number per class (default 10 per class)")),
      ("--eval-steps", dict(metavar="K", help="DDIM steps of those samples, guided by --sample-omega (default 50)")),
      ("--inception-weights", dict(metavar="PATH", help="FID Inception weights (pt_inception-2015-12-05-"
                                                        "6726825d.pth or its folder; default "
                                                        "$CBDM_FAST_INCEPTION): the feature network of "
                                                        "--eval-every on data sets other than digits"))]),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cbdm_fast.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for title, description, options in GROUPS:
        group = parser.add_argument_group(title, description)
        for flag, kwargs in options:
            kwargs = dict(kwargs)
            if "choices" not in kwargs:
                kwargs["type"] = FLAGS[flag][2]
                kwargs.setdefault("metavar", flag[2:].upper().replace("-", "_"))
            group.add_argument(flag, dest=flag, **kwargs)
        if title == "data":
            group.add_argument("--hflip", dest="--hflip", action=argparse.BooleanOptionalAction,
                               help="random horizontal flips (default on; off for digits)")
            group.add_argument("--augm", dest="--augm", action="store_true",
                               help="ADA augmentation as the authors' --augm (x/y flips, scale, rotation, "
                                    "anisotropy, translation with p 0.12, one batched warp on the device; its "
                                    "9 parameters condition the model; replaces --hflip)")
        if title == "method":
            group.add_argument("--per-sample-drop", dest="--per-sample-drop", action="store_true",
                               help="drop labels per sample instead of per batch (not the authors' default)")
        if title == "run":
            group.add_argument("--resume", dest="--resume", nargs="?", const="auto", metavar="CKPT",
                               help="continue a run exactly: a checkpoint, or the newest one in --logdir")
            group.add_argument("--no-progress", dest="--no-progress", action="store_true",
                               help="print a line every --log-every steps instead of a progress bar")
    return parser


def explicit_options(args: argparse.Namespace) -> dict:
    """{'section.field': value} for every flag given on the command line."""
    given = vars(args)
    out = {f"{FLAGS[f][0]}.{FLAGS[f][1]}": v for f, v in given.items() if f in FLAGS}
    if "--hflip" in given:
        out["data.hflip"] = given["--hflip"]
    if given.get("--augm"):
        out["data.augm"] = True
    if given.get("--per-sample-drop"):
        out["method.per_sample_drop"] = True
    if given.get("--no-progress"):
        out["run.progress"] = False
    return out


def config_from_options(options: dict) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in options.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg = apply_preset(cfg, set(options))
    if "run.logdir" not in options:
        cfg.run.logdir = f"runs/{cfg.data.dataset}_{cfg.method.method}"
    validate(cfg)
    return cfg


def _resume_path(arg: str, options: dict, say=print) -> Optional[Path]:
    """--resume CKPT: that file. --resume alone: the newest checkpoint of --logdir that verifies (newer
    ones that are corrupt are reported and skipped), or None when the folder has no checkpoint yet."""
    if arg != "auto":
        return Path(arg)
    logdir = Path(options.get("run.logdir", "runs/digits_cbdm"))
    if not ckpt_io.find_checkpoints(logdir):
        return None  # nothing to resume yet: the caller starts a new run
    path, skipped = ckpt_io.newest_good(logdir, log=lambda msg: say(msg, file=sys.stderr, flush=True))
    if path is None:
        raise ckpt_io.CheckpointError(f"--resume: none of the {len(skipped)} checkpoints in {logdir} is readable "
                                      f"(see the warnings above)")
    if skipped:
        say(f"falling back to {path.name}, the newest checkpoint that verifies", file=sys.stderr, flush=True)
    return path


# config fields set by flags that are not in FLAGS (switches)
SWITCHES = {"data.hflip": "--hflip/--no-hflip", "data.augm": "--augm", "method.per_sample_drop": "--per-sample-drop",
            "run.progress": "--no-progress"}


def flag_name(key: str) -> str:
    """'method.method' -> '--method'."""
    for flag, (section, name, _) in FLAGS.items():
        if f"{section}.{name}" == key:
            return flag
    return SWITCHES.get(key, key)


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


def _corrupt_hint(exc: Exception, args) -> str:
    """For --resume CKPT naming a corrupt file: the newest good checkpoint beside it, if any."""
    resume = vars(args).get("--resume")
    if not isinstance(exc, ckpt_io.CorruptCheckpoint) or resume in (None, "auto"):
        return ""
    good, _ = ckpt_io.newest_good(Path(resume).parent)
    if good is None:
        return ""
    return f"; the newest checkpoint there that verifies is {good}: --resume {good} (or --resume alone)"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = explicit_options(args)
    from . import dist
    from .training import Trainer, TrainingDiverged, dump_config, resume_trainer

    try:
        ctx = dist.from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else one process
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say = print if ctx.is_main else (lambda *a, **k: None)  # data parallel: rank 0 reports
    tag = f"[rank {ctx.rank}] " if ctx.enabled else ""
    trainer = None
    try:
        path = _resume_path(vars(args)["--resume"], options, say) if "--resume" in vars(args) else None
        if path is None and "--resume" in vars(args):
            say(f"--resume: no checkpoint in {options.get('run.logdir', 'runs/digits_cbdm')} yet; starting a new run",
                flush=True)
        if path is not None:
            state = ckpt_io.load(path)
            if not ckpt_io.is_ours(state):
                raise ckpt_io.CheckpointError(f"--resume {path}: not a cbdm_fast training checkpoint "
                                              f"(to start from the authors' weights use --finetune-from)")
            conflicts = fixed_option_conflicts(state["config"], options)
            if conflicts:
                parser.error(f"--resume continues a run with its saved configuration; these options cannot "
                             f"change: {'; '.join(conflicts)}")
            trainer = resume_trainer(path, overrides={k: v for k, v in options.items() if k in RESUMABLE},
                                     state=state)
            validate(trainer.cfg)
            say(f"resuming {path} at step {trainer.step}", flush=True)
        else:
            try:
                cfg = config_from_options(options)
            except ValueError as exc:
                parser.error(str(exc))
            trainer = Trainer(cfg)
        cfg = trainer.cfg
        say(trainer.describe(), flush=True)
        say(f"logdir: {cfg.run.logdir} (config.json, checkpoints, TensorBoard log, samples/)", flush=True)
        status = trainer.run()
    except TrainingDiverged as exc:
        last = ckpt_io.find_checkpoints(trainer.cfg.run.logdir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
        print(f"{tag}error: training stopped: {exc}; {where}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:  # bad data, checkpoint or option: say what, no traceback
        print(f"{tag}error: {exc}{_corrupt_hint(exc, args)}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    del dump_config
    return 0 if status in ("done", "interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
