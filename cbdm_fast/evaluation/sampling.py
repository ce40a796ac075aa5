"""python -m cbdm_fast.evaluate --ckpt: a sampling job (cbdm_fast.sampling, the library behind
python -m cbdm_fast.sample), then the evaluation of its samples.

Flags (the "sampling (with --ckpt)" group of the evaluate CLI), the job's options:
    --per-class N | --num-samples N     which labels (exactly one; --num-samples draws uniform labels)
    --method, --omega, --sampler, --steps, --schedule   as in python -m cbdm_fast.sample (same defaults)
    --sample-batch-size B               the sampler's --batch-size (evaluate's --batch-size is the
                                        feature-extraction batch)
    --samples-out PATH.npz              where the samples go (default: beside the checkpoint, named by
                                        the settings, see default_samples_path)
and evaluate's own --seed and --device, which the job gets too (and --threads, which evaluate sets).
The job runs in this process; its report and progress go to stderr (nothing with --quiet), so stdout
keeps evaluate's table. Under torchrun every rank runs it and it shards the images over the ranks itself.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from ..flags import require_at_least
from ..samplers import GUIDANCE, SAMPLERS, SPACINGS
from ..sampling import SampleRequest, run_sampling

SAMPLING_FLAGS = ("per_class", "num_samples", "method", "omega", "sampler", "steps", "schedule",
                  "sample_batch_size", "samples_out")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("sampling (with --ckpt; evaluate's --seed, --device and --threads are "
                                  "passed to the sampler too)")
    s.add_argument("--per-class", type=int, metavar="N", help="N images of every class")
    s.add_argument("--num-samples", type=int, metavar="N", help="N images with i.i.d. uniform labels")
    s.add_argument("--method", choices=GUIDANCE, help="guidance method (sampler default cfg)")
    s.add_argument("--omega", type=float, metavar="W", help="guidance strength for --method cfg "
                   "(sampler default 0.0)")
    s.add_argument("--sampler", choices=SAMPLERS, help="ddpm: all T steps (default); ddim, dpm++2m "
                   "(DPM-Solver++(2M)): --steps")
    s.add_argument("--steps", type=int, metavar="N", help="DDIM steps (sampler default 100, or T if smaller), "
                   "DPM-Solver++ steps (default 20)")
    s.add_argument("--schedule", choices=SPACINGS, help="--sampler dpm++2m: grid uniform in time or in log-SNR "
                   "(default: logsnr when its grid holds --steps, else time)")
    s.add_argument("--sample-batch-size", type=int, metavar="B", help="images per sampling batch "
                   "(sampler default 64)")
    s.add_argument("--samples-out", metavar="PATH.npz", help="samples file (default: beside --ckpt, "
                   "<ckpt stem>_samples_<method>_w<omega>_<pcN|nN>[_ddim<steps>|_dpm++2m<steps>[_logsnr]]"
                   "_seed<S>.npz)")


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
    require_at_least(parser, ("--per-class", args.per_class, 1), ("--num-samples", args.num_samples, 1),
                     ("--steps", args.steps, 1), ("--sample-batch-size", args.sample_batch_size, 1))
    if args.omega is not None and (not math.isfinite(args.omega) or args.omega < 0):
        parser.error(f"--omega must be a finite number >= 0, got {args.omega}")
    if args.schedule is not None and args.sampler != "dpm++2m":
        parser.error(f"--schedule applies to --sampler dpm++2m only (got --schedule {args.schedule} with "
                     f"--sampler {args.sampler or 'ddpm'})")


def default_samples_path(args: argparse.Namespace) -> Path:
    """Beside the checkpoint, named by everything that changes the images."""
    ckpt = Path(args.ckpt)
    count = f"pc{args.per_class}" if args.per_class is not None else f"n{args.num_samples}"
    sampler = ""
    if args.sampler in ("ddim", "dpm++2m"):
        sampler = f"_{args.sampler}{args.steps if args.steps is not None else ''}"
        sampler += "_logsnr" if args.schedule == "logsnr" else ""
    name = (f"{ckpt.stem}_samples_{args.method or 'cfg'}_w{args.omega or 0.0:g}_{count}{sampler}"
            f"_seed{args.seed}.npz")
    return ckpt.parent / name


def samples_path(args: argparse.Namespace) -> Path:
    return Path(args.samples_out) if args.samples_out else default_samples_path(args)


def sample_request(args: argparse.Namespace) -> SampleRequest:
    """The sampling job of evaluate's ``args``: its sampling flags given, the job's defaults for the others."""
    given = {name: value for name, value in (("method", args.method), ("omega", args.omega),
                                             ("sampler", args.sampler), ("batch_size", args.sample_batch_size))
             if value is not None}
    return SampleRequest(ckpt=str(args.ckpt), per_class=args.per_class, num_samples=args.num_samples,
                         steps=args.steps, spacing=args.schedule, seed=args.seed, device=args.device,
                         progress=not args.quiet,
                         out=str(samples_path(args)), **given)


def sample_from_checkpoint(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """--ckpt: the sampling job writes the samples file; its exit status (2: its message is printed).

    Every rank calls it: under torchrun the job shards the images over the ranks itself, in a process
    group of its own that it leaves before the evaluation joins one. Its report goes to ``log``
    (stderr, or nowhere with --quiet), so stdout keeps evaluate's table.
    """
    request = sample_request(args)
    log(f"sampling from {request.ckpt} into {request.out}")
    return run_sampling(request, say=log)
