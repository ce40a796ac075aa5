"""``python -m cbdm_fast.bench ceiling ...``: the matrix floor of the CBDM step and the bound it puts on
any backend's speed-up over the reference (method: ceiling.py)."""
from __future__ import annotations

import sys

from .cli_checks import add_model_args, check_model_args, parse_names
from .common import write_records


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ceiling", help="the step's matrix floor per precision, and the bound on any backend's speed-up",
        description="Replay the UNet's Conv2d/Linear calls of one training (or sampling) step in isolation, in "
                    "fp32 and bf16, and time the reference step in the same run: reference time / floor bounds "
                    "the speed-up any backend can reach through these kernels on this machine.")
    add_model_args(p, "B: the step's forward runs 2B images (default 8)",
                   "write a JSON list, one record per work and dtype")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes / steps (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed passes / steps (default 5)")
    p.add_argument("--work", default="train,sample", help="comma-separated from train,sample (default both)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32,bf16 (default both)")
    p.add_argument("--channels-last", action="store_true", help="replay the convolutions in channels_last")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args, error) -> int:
    from .ceiling import DTYPES, WORKS, CeilingBenchConfig, format_markdown, format_table, run_ceiling_bench

    args.peak_tflops = None  # check_model_args reads it; no MFU here
    check_model_args(args, error)
    if args.iters < 1:
        error(f"--iters must be >= 1, got {args.iters}")
    works = parse_names(args.work, "--work", WORKS, error, noun="work")
    dtypes = parse_names(args.dtypes, "--dtypes", tuple(DTYPES), error, noun="dtype")
    cfg = CeilingBenchConfig(device=args.device, batch_size=args.batch_size, model=args.model,
                             image_size=args.image_size, num_class=args.num_class, warmup=args.warmup,
                             iters=args.iters, works=works, dtypes=dtypes, channels_last=args.channels_last,
                             seed=args.seed)
    records = run_ceiling_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(records))
    write_records(records, args.json, args.markdown, format_markdown(records))
    return 0
