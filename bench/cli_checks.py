"""Argument checks shared by the benchmark subcommands; each calls ``error`` (the subparser's .error,
which exits with code 2) with a message naming the flag."""
from __future__ import annotations

from typing import Callable, NoReturn

import torch

from .workload import MODELS

Error = Callable[[str], NoReturn]


def add_output_args(p, json_help: str, device: str = "cpu") -> None:
    """The options every benchmark has: where it runs, and its JSON records (required) and markdown table."""
    p.add_argument("--device", choices=["cpu", "cuda"], default=device)
    p.add_argument("--json", required=True, metavar="PATH", help=json_help)
    p.add_argument("--markdown", metavar="PATH", help="also write the table(s) as markdown")


def add_model_args(p, batch_help: str, json_help: str) -> None:
    """The options every model-level benchmark shares: device, batch size, the outputs and the model."""
    add_output_args(p, json_help)
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--model", choices=["default", "small"], default="default",
                   help="default: the authors' 35.9M UNet; small: ch 32, ch_mult 1 2, one res block")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 (default model), 16 (small)")
    p.add_argument("--num-class", type=int, default=None, help="default: 100 (default model), 10 (small)")


def parse_names(raw: str, flag: str, allowed: tuple, error: Error, noun: str = "name") -> tuple:
    """A comma-separated list of names from ``allowed``: at least one, none unknown, none repeated."""
    names = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in names if s not in allowed]
    if unknown or not names:
        error(f"{flag}: unknown {noun}(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        error(f"{flag}: duplicate names in {raw!r}")
    return tuple(names)


def check_model_args(args, error: Error) -> None:
    """--batch-size, --warmup, --num-class, --peak-tflops, --image-size (for --model) and --device cuda."""
    if args.batch_size < 1:
        error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.warmup < 0:
        error(f"--warmup must be >= 0, got {args.warmup}")
    if args.num_class is not None and args.num_class < 1:
        error(f"--num-class must be >= 1, got {args.num_class}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    levels = len(MODELS[args.model][0]["ch_mult"]) - 1
    if args.image_size is not None and (args.image_size < 2 ** levels or args.image_size % 2 ** levels):
        error(f"--image-size must be a positive multiple of {2 ** levels} for --model {args.model}, "
              f"got {args.image_size}")
    check_device(args, error)


def check_device(args, error: Error) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: CUDA is not available on this machine")


# torch.compile modes the compiled backends accept (no inductor CUDA graphs: the step makes its own)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
