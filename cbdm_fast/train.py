"""python -m cbdm_fast.train: train DDPM, CFG or CBDM on a (long-tailed) image data set.

With no flags it trains CBDM on the built-in long-tailed digits (a demo of a few minutes on a CPU).
Data parallel on N GPUs (or CPU processes): torchrun --standalone --nproc_per_node N -m cbdm_fast.train ...
with --batch-size the global batch (see cbdm_fast/training/ddp.py).

Exit status: 0 done; 2 a bad option, data set, checkpoint or --logdir; 3 the loss diverged; 75 stopped by
SIGINT/SIGTERM before the last step, with a checkpoint saved (--resume continues); 130 stopped at once by
a second signal, or by one before training started (cbdm_fast/interrupts.py).
"""
from __future__ import annotations

import argparse
import sys

from . import dist
from .interrupts import EXIT_INTERRUPTED, EXIT_STOPPED
from .data import DATASETS
from .data.longtail import IMB_TYPES
from .schedule import VAR_TYPES
from .training.config import (
    BACKEND_OPTIONS, EVAL_SAMPLERS, KERNEL_OPTIONS, METHODS, PRECISION_OPTIONS, STORAGES, Y_BAL,
)
from .training.launch import FLAGS, OptionError, launch
from .training.step import TrainingDiverged

GROUPS = [
    ("data", "which images (default: the built-in long-tailed digits)",
     [("--dataset", dict(choices=DATASETS, help="data set (default digits)")),
      ("--data-root", dict(help="CIFAR archive or its folder; image folder root for folder/folderlt")),
      ("--imb-factor", dict(help="tail/head ratio in (0, 1] (default 0.1 digits, 0.01 CIFAR-LT)")),
      ("--imb-type", dict(choices=IMB_TYPES, help="long-tail profile (default exp)")),
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
      ("--lr", dict(help="learning rate (default 2e-4; digits 2e-3)")),
      ("--warmup", dict(help="warm-up steps (default 5000; digits 100)")),
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
      ("--var-type", dict(choices=VAR_TYPES, help="sampling variance (default fixedlarge)")),
      ("--threads", dict(help="CPU threads for torch (default: torch's); 1 helps on a busy small machine")),
      ("--backend", dict(choices=BACKEND_OPTIONS, help="training step: eager (the authors' step, the reference), "
                                                       "fused (one 2B forward, device draws, fused optimizer), "
                                                       "compiled (fused under torch.compile; one CUDA graph per step "
                                                       "on a GPU); auto: compiled on CUDA, fused on CPU "
                                                       "(default auto)")),
      ("--precision", dict(choices=PRECISION_OPTIONS, help="fused/compiled: bf16 autocast with fp32 master weights, "
                                                           "or fp32; auto: bf16 (eager is always fp32)")),
      ("--kernels", dict(choices=KERNEL_OPTIONS, help="fused/compiled: the step's kernels, never its math: fused "
                                                      "(ours: q_sample, CBDM loss, GroupNorm+SiLU, SDPA attention), "
                                                      "inductor (torch's formulas; torch.compile makes its own "
                                                      "kernels); auto: per device the kernels each step was "
                                                      "measured with, the run's first lines say which and why "
                                                      "(default auto); a resumed run may change it"))]),
    ("evaluation during training", "rank 0 scores EMA samples with python -m cbdm_fast.evaluate's metrics; "
     "TensorBoard eval/<metric> and <logdir>/eval.jsonl",
     [("--eval-every", dict(metavar="N", help="evaluate every N steps; 0: off (default 0)")),
      ("--eval-samples", dict(metavar="M", help="class-balanced samples per evaluation, rounded up to a whole "
                                                "number per class (default 10 per class)")),
      ("--eval-sampler", dict(choices=EVAL_SAMPLERS, help="the sampler of those samples, guided by --sample-omega: "
                                                          "dpm++2m (DPM-Solver++(2M), the default) or ddim")),
      ("--eval-steps", dict(metavar="K", help="its steps (default 20 for dpm++2m, 50 for ddim)")),
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
            group.add_argument("--start-over", dest="--start-over", action="store_true",
                               help="start a new run in a --logdir that holds another run, moving that run into "
                                    "<logdir>/replaced-<time>/ first (without it such a logdir is refused)")
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ctx = dist.from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else one process
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tag = f"[rank {ctx.rank}] " if ctx.enabled else ""
    try:
        status = launch(explicit_options(args), resume=vars(args).get("--resume"),
                        start_over=vars(args).get("--start-over", False))
    except OptionError as exc:
        parser.error(str(exc))
    except TrainingDiverged as exc:
        print(f"{tag}error: training stopped: {exc}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:  # bad data, checkpoint, option or logdir: say what, no traceback
        print(f"{tag}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a second signal: one line (launch names the last checkpoint)
        print(f"{tag}{str(exc) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_STOPPED if status == "stopped" else 0


if __name__ == "__main__":
    sys.exit(main())
