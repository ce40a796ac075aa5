"""Where the time of one training step goes: ``python -m cbdm_fast.bench.profile_step``.

Runs a backend of the training benchmark (the same model, data and step as ``bench train``), warms
it up, then records ``--steps`` steps with torch.profiler and prints the device time per step,
split into kernel groups (ours, convolution, GEMM, attention, Triton/inductor, other) and the slowest
kernels. On CUDA the time is the GPU kernels' (kernels replayed inside a CUDA graph included where the
profiler sees them); on CPU it is the self time of the operators. Use it to decide what to optimise
next; the speed figures themselves come from ``bench train``. ``--kernels`` picks the step's kernels as
``bench train --kernels`` does (fused: ours; inductor: torch's formulas), so a run per choice splits the
device time of both into the same groups.

``--copies`` answers "who launches the copies?": it runs one more step of the same backend WITHOUT the
whole-step CUDA graph (a graph replay hides the host operators that launched its kernels), records the
operators with their input shapes, and lists every copy-like operator (aten::copy_, clone, contiguous,
_to_copy) with its device time and the chain of operators that called it, e.g. a layout conversion
inside ``aten::convolution_backward``. A graph-replayed bf16 step on an H200 spent 16% of its time in
101 such copies (bench/RESULTS.md); this names their callers.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
from typing import Optional, Sequence

import torch

from cbdm_fast.flags import require_at_least

# kernel-name fragments -> group; the first group whose fragment occurs in the lowercased name wins, after
# "ours" (_ours: the kernels of kernels/ and csrc/, and the cbdm_fast:: custom ops)
GROUPS = (
    ("convolution", ("conv", "xmma", "implicit_gemm", "cudnn", "dgrad", "wgrad", "fprop", "mkldnn")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("gemm", ("gemm", "cutlass", "nvjet", "addmm", "mm", "matmul", "linear")),
    ("triton", ("triton",)),
)


@functools.lru_cache(maxsize=1)
def _our_kernel_names() -> tuple:
    """The function names of the Triton kernels of kernels/: a profiler row of one starts with it (whole
    names, because fragments such as "_apply_kernel" also match torch's multi_tensor_apply_kernel of the
    fused optimizer)."""
    from cbdm_fast.kernels import cb_loss, group_norm_silu, group_norm_silu_rows, q_sample
    return tuple(name.lower() for module in (cb_loss, group_norm_silu, group_norm_silu_rows, q_sample)
                 for name in vars(module) if name.startswith("_") and name.endswith("_kernel"))


def _ours(low: str) -> bool:
    # a Triton kernel's row is its function name; the extension's CUDA kernels are cbdm::...; the custom ops
    # (CPU rows) cbdm_fast::...
    return low.startswith(_our_kernel_names()) or "cbdm::" in low or "cbdm_fast::" in low


def group_of(name: str) -> str:
    low = name.lower()
    if _ours(low):
        return "ours"
    for group, fragments in GROUPS:
        if any(f in low for f in fragments):
            return group
    return "other"


def profile_step(step, device: torch.device, steps: int) -> list[tuple[str, int, float]]:
    """[(kernel or op name, calls per step, microseconds per step)] over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        if us is None:  # older torch
            us = e.self_cuda_time_total
        if us > 0:
            rows.append((e.key, e.count // steps, us / steps))
    return sorted(rows, key=lambda r: -r[2])


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


def _chain(event, depth: int = 4) -> str:
    """The operator and up to ``depth`` of its callers, outermost first."""
    names, e = [], event
    while e is not None and len(names) <= depth:
        names.append(e.name)
        e = e.cpu_parent
    return " > ".join(reversed(names))


def explain_copies(step, device: torch.device) -> list[dict]:
    """The copy-like operators of one ``step()`` (outermost copy op of each nest only), grouped by caller
    chain and input shapes: [{"chain", "shapes", "calls", "us"}], slowest first. Device time on CUDA,
    CPU time otherwise."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    groups: dict = {}
    for e in prof.events():
        if e.name not in COPY_OPS:
            continue
        parent = e.cpu_parent
        if parent is not None and parent.name in COPY_OPS:
            continue  # counted with the copy op that contains it
        us = e.device_time_total if cuda else e.cpu_time_total
        key = (_chain(e), str([list(s) for s in e.input_shapes if s]))
        g = groups.setdefault(key, {"chain": key[0], "shapes": key[1], "calls": 0, "us": 0.0})
        g["calls"] += 1
        g["us"] += us
    return sorted(groups.values(), key=lambda g: -g["us"])


def format_copies(rows: list, top: int) -> str:
    total = sum(r["us"] for r in rows)
    lines = [f"copy-like operators in one step without the CUDA graph: {sum(r['calls'] for r in rows)} calls, "
             f"{total / 1e3:.3f} ms"]
    lines += [f"  {r['us'] / 1e3:8.3f} ms  x{r['calls']:<4d} {r['chain']}  {r['shapes'][:120]}" for r in rows[:top]]
    return "\n".join(lines)


def summarise(rows: list, top: int) -> dict:
    total = sum(r[2] for r in rows)
    groups = collections.Counter()
    for name, _, us in rows:
        groups[group_of(name)] += us
    return {"total_us_per_step": total,
            "groups": {g: {"us_per_step": us, "share": us / total if total else 0.0} for g, us in groups.most_common()},
            "top": [{"name": n, "calls_per_step": c, "us_per_step": us} for n, c, us in rows[:top]]}


def format_summary(s: dict, title: str) -> str:
    lines = [title, f"device time per step: {s['total_us_per_step'] / 1e3:.3f} ms"]
    lines += [f"  {g:12s} {v['us_per_step'] / 1e3:8.3f} ms  {100 * v['share']:5.1f}%" for g, v in s["groups"].items()]
    lines.append("slowest:")
    lines += [f"  {t['us_per_step'] / 1e3:8.3f} ms  x{t['calls_per_step']:<4d} {t['name'][:100]}" for t in s["top"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cbdm_fast.training.config import KERNEL_OPTIONS
    from .cli_checks import COMPILE_MODES
    from .train import FAST_WARMUP, SINGLE_PROCESS
    from .workload import MODELS

    p = argparse.ArgumentParser(prog="python -m cbdm_fast.bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--backend", choices=SINGLE_PROCESS, default="compiled_bf16")
    p.add_argument("--channels-last", action="store_true", help="fast backends: channels_last memory format")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--kernels", choices=KERNEL_OPTIONS, default="auto",
                   help="fast backends: fused (ours) or inductor (torch's formulas); auto as the trainer picks")
    p.add_argument("--warmup", type=int, default=FAST_WARMUP + 3, help="untimed steps first (compile, capture)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=25, help="how many of the slowest kernels to list")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--copies", action="store_true",
                   help="also profile one step without the CUDA graph and list the copy operators by caller")
    args = p.parse_args(argv)
    require_at_least(p, ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                     ("--top", args.top, 1))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    from cbdm_fast.model import UNet

    from .train import kernels_for, make_step
    from .workload import long_tail_probs, model_config, synthetic_batches, use_fast_cuda_math

    device = torch.device(args.device)
    use_fast_cuda_math(device)
    _, size, num_class = MODELS[args.model]
    torch.manual_seed(0)
    base = UNet(**model_config(args.model, num_class))
    probs = long_tail_probs(num_class)
    batches = synthetic_batches(4, args.batch_size, size, probs, device, 1)
    step = make_step(args.backend, base, batches, probs, device, channels_last=args.channels_last,
                     compile_mode=args.compile_mode, kernels=args.kernels)
    for _ in range(args.warmup):
        step()
    kernels, why = kernels_for(args.backend, args.kernels, device)
    summary = summarise(profile_step(step, device, args.steps), args.top)
    summary.update(backend=args.backend, device=args.device, batch_size=args.batch_size, model=args.model,
                   channels_last=args.channels_last, compile_mode=args.compile_mode, kernels=kernels,
                   kernels_why=why, torch_version=torch.__version__)
    on = "" if kernels is None else f" on {kernels} kernels"
    print(format_summary(summary, f"{args.backend} step{on}, {args.model} UNet, batch {args.batch_size}, {device}"))
    if args.copies:
        plain = make_step(args.backend, base, batches, probs, device, channels_last=args.channels_last,
                          compile_mode=args.compile_mode, cuda_graph=False, kernels=args.kernels)
        for _ in range(2):  # compile (the graph-free step shares nothing compiled with the one above)
            plain()
        summary["copies"] = explain_copies(plain, device)
        print(format_copies(summary["copies"], args.top))
    if args.json:
        from .common import write_records
        write_records([summary], args.json, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
