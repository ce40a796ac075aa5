"""``python -m cbdm_fast.bench ops ...``: the per-op benchmark CLI (method: bench/ops/).

Wiring (in the bench entry point)::

    ops_parser = ops_cli.add_parser(subparsers)
    ...
    if args.command == "ops":
        return ops_cli.run(args, ops_parser.error)
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from .cli_checks import add_output_args, check_device, parse_names
from .ops import OPS
from .ops.case import DTYPES, LAYOUTS, MODES, PROVIDERS, SIZES
from .common import write_records

COMMAND = "ops"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``ops`` subcommand on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        COMMAND, help="per-op benchmark: torch / fused / compiled providers, fwd / bwd / full modes",
        description="Time each fused op against its torch composite and torch.compile of it, forward, "
                    "backward and both; median and p20/p80, GB/s and percent of the device copy bandwidth, "
                    "peak memory, speedup vs torch.")
    add_output_args(p, json_help="write a JSON list, one record per (op setup, provider, mode)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, default all: {','.join(OPS)}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: torch,fused,compiled")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: fwd,bwd,full (ops without a "
                   "backward only run fwd)")
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="train: the training / sampling shapes; small: tiny shapes "
                        "(default: train on cuda, small on cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--layout", choices=list(LAYOUTS), default="channels_last",
                   help="of the image tensors (ddpm_step / ddim_step are always contiguous)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default 10 cuda, 1 cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default 100 cuda, 5 cpu)")
    p.add_argument("--no-l2-flush", action="store_true", help="cuda: do not zero a 256 MiB buffer before each call")
    p.add_argument("--timing", choices=["eager", "graph"], default="eager",
                   help="eager: CUDA events around each call (host launch and autograd time included); graph "
                        "(cuda): GPU time only, from CUDA-graph replays of 20 calls")
    p.add_argument("--seed", type=int, default=0)
    return p


def _names(args, flag: str, allowed: tuple, error: Callable[[str], NoReturn]) -> tuple:
    return parse_names(getattr(args, flag.lstrip("-").replace("-", "_")), flag, allowed, error)


def check_args(args, error: Callable[[str], NoReturn]):
    """The OpsBenchConfig of validated ``args``; ``error`` (the subparser's .error) on a bad value."""
    from .ops.run import OpsBenchConfig
    ops = _names(args, "--ops", OPS, error)
    providers = _names(args, "--providers", PROVIDERS, error)
    modes = _names(args, "--modes", MODES, error)
    if args.warmup is not None and args.warmup < 0:
        error(f"--warmup must be >= 0, got {args.warmup}")
    if args.reps is not None and args.reps < 1:
        error(f"--reps must be >= 1, got {args.reps}")
    check_device(args, error)
    if args.timing == "graph" and args.device != "cuda":
        error("--timing graph (CUDA-graph replay) needs --device cuda")
    return OpsBenchConfig(device=args.device, ops=ops, providers=providers, modes=modes, size=args.size,
                          dtype=args.dtype, layout=args.layout, warmup=args.warmup, reps=args.reps,
                          flush_l2=not args.no_l2_flush, timing=args.timing, seed=args.seed)


def run(args, error: Callable[[str], NoReturn]) -> int:
    """Run the benchmark of parsed ``args``: markdown to stdout, JSON (and markdown) files. Returns 0."""
    from .ops.run import format_markdown, run_ops_bench
    cfg = check_args(args, error)
    records = run_ops_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    text = format_markdown(records)
    print(text)
    write_records(records, args.json, args.markdown, text)
    return 0
