"""``python -m cbdm_fast.bench train|ops|sample|ceiling ...``: benchmark CLI (the method of each is in its
module: bench/train.py, ops/, sample.py, ceiling.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli_checks import COMPILE_MODES, add_model_args, check_model_args, parse_names
from .common import write_records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbdm_fast.bench", description="cbdm_fast benchmarks")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,ops,sample,ceiling}")
    t = sub.add_parser("train", help="CBDM training step: eager reference vs fused backends, side by side",
                       description="Time the eager reference CBDM training step and the fused backends in one run.")
    add_model_args(t, "images per step (default 8)", "write a JSON list, one record per backend")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--iters", type=int, default=5)
    t.add_argument("--backends", default="auto",
                   help="comma-separated from eager,fused,fused_bf16,compiled,compiled_bf16 and their DDP variants "
                        "fused_ddp,fused_bf16_ddp,compiled_ddp,compiled_bf16_ddp (one-process group: the DDP overhead); "
                        "auto: all but the DDP ones on cuda, and on cpu also not the compiled ones (compiling the "
                        "default UNet takes minutes there)")
    t.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="fused backends: auto times both layouts and keeps the faster")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 790 on CUDA, the H200 bf16 peak; no MFU on CPU unless given)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of the compiled backends; the no-cudagraphs variant because the "
                        "step makes its own CUDA graph (max-autotune: inductor benchmarks Triton GEMM/conv "
                        "templates against cuBLAS/cuDNN; compiles for minutes)")
    t.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="compiled backends on CUDA: no whole-step CUDA graph (to separate DDP's own overhead from "
                        "the graph it forgoes)")
    t.add_argument("--ddp-cuda-graph", action="store_true",
                   help="compiled *_ddp backends on CUDA: capture the DDP step as a CUDA graph too (experimental)")
    t.add_argument("--kernels", default="auto",
                   help="comma-separated from auto,fused,inductor: the fast backends' kernels, each timed in turn "
                        "(fused: ours from cbdm_fast.ops; inductor: torch's formulas, compiled by inductor in the "
                        "compiled backends; auto: as python -m cbdm_fast.train --kernels auto picks for the device); "
                        "e.g. fused,inductor times compiled_bf16 with both in one run (default auto)")
    from . import ceiling_cli, ops_cli, sample_cli
    others = {"ops": (ops_cli, ops_cli.add_parser(sub)), "sample": (sample_cli, sample_cli.add_parser(sub)),
              "ceiling": (ceiling_cli, ceiling_cli.add_parser(sub))}
    return t, p, others


def _check_train(args, error) -> tuple:
    """(backends, kernel choices) from --backends and --kernels."""
    from cbdm_fast.training.config import KERNEL_OPTIONS
    from .train import BACKENDS
    check_model_args(args, error)
    if args.iters < 1:
        error(f"--iters must be >= 1, got {args.iters}")
    if args.backends == "auto":
        args.backends = ",".join(b for b in BACKENDS if not b.endswith("_ddp")
                                 and (args.device == "cuda" or not b.startswith("compiled")))
    return (parse_names(args.backends, "--backends", BACKENDS, error, noun="backend"),
            parse_names(args.kernels, "--kernels", KERNEL_OPTIONS, error, noun="kernel choice"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    train_parser, parser, others = _parser()
    args = parser.parse_args(argv)
    if args.command in others:
        module, sub_parser = others[args.command]
        return module.run(args, sub_parser.error)
    if args.command == "train":
        from .train import TrainBenchConfig, format_markdown, format_table, run_train_bench
        backends, kernels = _check_train(args, train_parser.error)
        cfg = TrainBenchConfig(device=args.device, batch_size=args.batch_size, model=args.model,
                               image_size=args.image_size, num_class=args.num_class, warmup=args.warmup,
                               iters=args.iters, backends=backends, channels_last=args.channels_last,
                               peak_tflops=args.peak_tflops, seed=args.seed, compile_mode=args.compile_mode,
                               cuda_graph=args.cuda_graph, ddp_cuda_graph=args.ddp_cuda_graph, kernels=kernels)
        records = run_train_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(records))
        write_records(records, args.json, args.markdown, format_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
