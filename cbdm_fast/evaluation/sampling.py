"""python -m cbdm_fast.evaluate --ckpt: sample with python -m cbdm_fast.sample's own main(), then evaluate.

Flags (the "sampling (with --ckpt)" group of the evaluate CLI), passed through to the sampler:
    --per-class N | --num-samples N     which labels (exactly one; --num-samples draws uniform labels)
    --method, --omega, --sampler, --steps   as in python -m cbdm_fast.sample (same defaults)
    --sample-batch-size B               the sampler's --batch-size (evaluate's --batch-size is the
                                        feature-extraction batch)
    --samples-out PATH.npz              where the samples go (default: beside the checkpoint, named by
                                        the settings, see default_samples_path)
and evaluate's own --seed, --device and --threads, which the sampler gets too. The sampler runs in
this process; its progress goes to stderr (nothing with --quiet), so stdout keeps evaluate's table.
Under torchrun every rank runs it and it shards the images over the ranks itself.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from pathlib import Path

SAMPLING_FLAGS = ("per_class", "num_samples", "method", "omega", "sampler", "steps", "sample_batch_size",
                  "samples_out")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("sampling (with --ckpt; evaluate's --seed, --device and --threads are "
                                  "passed to the sampler too)")
    s.add_argument("--per-class", type=int, metavar="N", help="N images of every class")
    s.add_argument("--num-samples", type=int, metavar="N", help="N images with i.i.d. uniform labels")
    s.add_argument("--method", choices=("cfg", "cond", "uncond"), help="guidance method (sampler default cfg)")
    s.add_argument("--omega", type=float, metavar="W", help="guidance strength for --method cfg "
                   "(sampler default 0.0)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), help="ddpm: all T steps (default); ddim: --steps")
    s.add_argument("--steps", type=int, metavar="N", help="DDIM steps (sampler default 100, or T if smaller)")
    s.add_argument("--sample-batch-size", type=int, metavar="B", help="images per sampling batch "
                   "(sampler default 64)")
    s.add_argument("--samples-out", metavar="PATH.npz", help="samples file (default: beside --ckpt, "
                   "<ckpt stem>_samples_<method>_w<omega>_<pcN|nN>[_ddim<steps>]_seed<S>.npz)")


def check_sampling_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.ckpt is None:
        if given:
            what = f"{given[0]} is a sampling flag: it needs" if len(given) == 1 else \
                f"{', '.join(given)} are sampling flags: they need"
            parser.error(f"{what} --ckpt (--samples evaluates an existing file)")
        return
    if (args.per_class is None) == (args.num_samples is None):
        parser.error("--ckpt needs exactly one of --per-class N and --num-samples N"
                     + (" (not both)" if args.per_class is not None else ""))
    for flag, value in (("--per-class", args.per_class), ("--num-samples", args.num_samples),
                        ("--steps", args.steps), ("--sample-batch-size", args.sample_batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.omega is not None and (not math.isfinite(args.omega) or args.omega < 0):
        parser.error(f"--omega must be a finite number >= 0, got {args.omega}")


def default_samples_path(args: argparse.Namespace) -> Path:
    """Beside the checkpoint, named by everything that changes the images."""
    ckpt = Path(args.ckpt)
    count = f"pc{args.per_class}" if args.per_class is not None else f"n{args.num_samples}"
    sampler = f"_ddim{args.steps if args.steps is not None else ''}" if args.sampler == "ddim" else ""
    name = (f"{ckpt.stem}_samples_{args.method or 'cfg'}_w{args.omega or 0.0:g}_{count}{sampler}"
            f"_seed{args.seed}.npz")
    return ckpt.parent / name


def samples_path(args: argparse.Namespace) -> Path:
    return Path(args.samples_out) if args.samples_out else default_samples_path(args)


def sampler_argv(args: argparse.Namespace, device: str, out: Path) -> list[str]:
    """The python -m cbdm_fast.sample command line for evaluate's ``args``."""
    argv = ["--ckpt", str(args.ckpt), "--out", str(out), "--seed", str(args.seed), "--device", device]
    for flag, value in (("--per-class", args.per_class), ("--num-samples", args.num_samples),
                        ("--method", args.method), ("--omega", args.omega), ("--sampler", args.sampler),
                        ("--steps", args.steps), ("--batch-size", args.sample_batch_size),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quiet:
        argv.append("--no-progress")
    return argv


def run_sampler(argv: list[str], quiet: bool) -> int:
    """cbdm_fast.sample.main(argv) in this process; its exit status (argparse exits included).

    Its stdout goes to stderr (or nowhere with ``quiet``); its error messages always reach stderr.
    """
    from .. import sample

    target = io.StringIO() if quiet else sys.stderr
    try:
        with contextlib.redirect_stdout(target):
            code = sample.main(argv)
    except SystemExit as exc:  # the sampler's own argument check
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code or 0)
