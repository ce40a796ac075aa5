"""``python -m cbdm_fast.bench sample ...``: the sampling-step benchmark CLI (method: sample.py).

``add_parser(subparsers)`` registers the ``sample`` subcommand; ``run(args, error)`` runs it
(``error(message)`` reports a usage error and exits 2, e.g. ``parser.error``) and returns the exit status.
"""
from __future__ import annotations

import sys

from .cli_checks import add_model_args, check_model_args, parse_names
from .common import write_records


def add_parser(subparsers):
    p = subparsers.add_parser(
        "sample", help="guided sampling step: the authors' reference sampler vs ours, side by side",
        description="Time one guided sampling step of the reference sampler (fp32, two forwards, Python loop) "
                    "and of the fast sampler (one 2B forward, the extension's step; on CUDA bf16 and CUDA-graph "
                    "replay) in one run. Derived: 1000-step, DDIM-100 and the sampler's own samples/s "
                    "(DDPM 1000 steps, DDIM 100, DPM-Solver++ 20).")
    add_model_args(p, "samples per batch (the forward runs 2x this)", "write a JSON list, one record per backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend (default 2)")
    p.add_argument("--steps-timed", type=int, default=5, help="timed steps per backend (default 5)")
    p.add_argument("--backends", default=None,
                   help="comma-separated from reference,fast,fast_bf16 (CPU),fast_graph,fast_compiled (CUDA); default: "
                        "reference,fast,fast_bf16 on CPU, reference,fast,fast_graph,fast_compiled on CUDA")
    p.add_argument("--sampler", default="ddpm", help="comma-separated from ddpm,ddim,dpm++2m: the fast backends' "
                   "samplers (step ops), one row per sampler and fast backend (default ddpm)")
    p.add_argument("--omega", type=float, default=1.6, help="guidance strength (> 0: guided steps; default 1.6)")
    p.add_argument("--channels-last", action="store_true", help="fast backends: channels_last activations")
    p.add_argument("--patch-model", action="store_true",
                   help="fast backends: swap in the fused modules of cbdm_fast.nn (GroupNorm+SiLU, attention)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 790 on CUDA, the H200 bf16 peak; none on CPU unless given)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _check(args, error) -> tuple:
    """(backends, samplers) from the flags; usage errors through ``error``."""
    from .sample import BACKENDS, CPU_DEFAULT, CUDA_DEFAULT, SAMPLE_STEPS, check_backends
    check_model_args(args, error)
    samplers = tuple(parse_names(args.sampler, "--sampler", tuple(SAMPLE_STEPS), error, noun="sampler"))
    if args.steps_timed < 1:
        error(f"--steps-timed must be >= 1, got {args.steps_timed}")
    if not args.omega > 0 or args.omega != args.omega or args.omega == float("inf"):
        error(f"--omega must be a finite number > 0 (a guided step), got {args.omega}")
    if args.backends is None:
        return (CUDA_DEFAULT if args.device == "cuda" else CPU_DEFAULT), samplers
    names = parse_names(args.backends, "--backends", BACKENDS, error, noun="backend")
    try:
        check_backends(names, args.device)
    except ValueError as exc:
        error(f"--backends: {exc}")
    return tuple(names), samplers


def run(args, error) -> int:
    from .sample import SampleBenchConfig, format_markdown, format_table, run_sample_bench

    backends, samplers = _check(args, error)
    cfg = SampleBenchConfig(device=args.device, batch_size=args.batch_size, model=args.model,
                            image_size=args.image_size, num_class=args.num_class, warmup=args.warmup,
                            steps_timed=args.steps_timed, backends=backends, samplers=samplers,
                            omega=args.omega, channels_last=args.channels_last, patch=args.patch_model, peak_tflops=args.peak_tflops,
                            seed=args.seed)
    records = run_sample_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(records))
    write_records(records, args.json, args.markdown, format_markdown(records))
    return 0

