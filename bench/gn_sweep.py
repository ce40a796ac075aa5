"""GroupNorm+SiLU kernel sweep: ``python -m cbdm_fast.bench.gn_sweep --device cuda --json OUT.json``.

One GPU run settles the channels-last launch configuration of ``ops.group_norm_silu`` (#14): for every
training shape of the default UNet (batch 48 and 128, i.e. the fused step's 2B = 96 and 256 rows, at
128x32x32, 256x16x16, 256x8x8 and 256x4x4, bf16, channels_last, fp32 weight and bias) it times, in GPU
time (CUDA-graph replays, common.time_fn_graph), the forward and the forward+backward of

  torch      F.group_norm -> F.silu (weight and bias cast to bf16: CUDA's group_norm wants one dtype)
  compiled   torch.compile of that formula (inductor's own normalisation; --no-compiled skips it)
  VARIANTS   our kernels under each launch configuration below (kernels/group_norm_silu.py STRATEGY
             "groups": whole groups per program; "rows": whole-row tiles with split reductions,
             kernels/group_norm_silu_rows.py), set through the kernel modules' attributes

and reports GB/s of the counted minimum bytes (forward: read x, write y; backward: read x and dy,
write dx; the byte model of bench/ops/group_norm.py) as a percentage of the device copy bandwidth measured in the same
run, the speed-up over torch and over torch.compile, the best variant per shape and whether #14's
targets hold (fwd+bwd >= 2x torch, faster than compiled, >= 70% of copy bandwidth). Every variant's
output and gradients are compared with torch's first (max relative difference, bf16 rounding ~1e-2).
The speed figures of record come from this run's JSON; bench/RESULTS.md keeps the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .cli_checks import add_output_args, parse_names
from .common import (copy_bandwidth, device_name, git_commit, markdown_table, provenance, publish, time_fn,
                     time_fn_graph)

GROUPS = 32
EPS = 1e-5
SHAPES = [(n, c, h, h) for n in (96, 256) for c, h in ((128, 32), (256, 16), (256, 8), (256, 4))]
SMALL_SHAPES = [(2, 64, 4, 4), (3, 32, 5, 5)]   # CPU / interpreter smoke runs
# name -> {module attribute: value}; "gns" is kernels.group_norm_silu, "rows" its rows module
VARIANTS = {
    "groups": {"gns.STRATEGY": "groups"},
    "groups_rb16": {"gns.STRATEGY": "groups", "gns.ROW_BYTES": 16},
    "groups_rb64": {"gns.STRATEGY": "groups", "gns.ROW_BYTES": 64},
    "groups_t8k": {"gns.STRATEGY": "groups", "gns.MAX_TILE": 8192},  # no register spill at 32x32 (see MAX_TILE)
    "groups_t4k": {"gns.STRATEGY": "groups", "gns.MAX_TILE": 4096},
    "rows_t2k": {"gns.STRATEGY": "rows", "rows.ROWS_TILE": 2048},
    "rows_t4k": {"gns.STRATEGY": "rows", "rows.ROWS_TILE": 4096},
    "rows_t8k": {"gns.STRATEGY": "rows", "rows.ROWS_TILE": 8192},
    "rows_t16k": {"gns.STRATEGY": "rows", "rows.ROWS_TILE": 16384},
}
TARGET_VS_TORCH, TARGET_PCT_COPY = 2.0, 70.0


def _modules():
    return {"gns": importlib.import_module("cbdm_fast.kernels.group_norm_silu"),
            "rows": importlib.import_module("cbdm_fast.kernels.group_norm_silu_rows")}


@contextlib.contextmanager
def variant(settings: dict):
    """The kernel modules' attributes set to ``settings`` for the block, restored after it."""
    mods = _modules()
    saved = []
    try:
        for key, value in settings.items():
            mod, attr = key.split(".")
            saved.append((mods[mod], attr, getattr(mods[mod], attr)))
            setattr(mods[mod], attr, value)
        mods["gns"]._config.cache_clear()
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)
        mods["gns"]._config.cache_clear()


def _inputs(shape, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, generator=g) * 0.2 + 1).to(device)
    b = (torch.randn(C, generator=g) * 0.2).to(device)
    dy = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), dy


def _torch_gn(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype), EPS))


def _fused_gn(x, w, b):
    from cbdm_fast import ops
    return ops.group_norm_silu(x, w, b, GROUPS, EPS, backend="triton")


def _calls(fn, x, w, b, dy):
    """{"fwd": callable, "full": callable} of fn on these inputs."""
    leaves = (x, w, b)
    return {"fwd": lambda: fn(x, w, b),
            "full": lambda: torch.autograd.grad(fn(x, w, b), leaves, dy)}


def _outputs(fn, x, w, b, dy) -> list:
    y = fn(x, w, b)
    return [y.detach().float()] + [g.float() for g in torch.autograd.grad(y, (x, w, b), dy)]


def _rel_diff(a: list, ref: list) -> float:
    return max(float((p - r).abs().max()) / max(float(r.abs().max()), 1e-30) for p, r in zip(a, ref))


def _time(fn, device, warmup, reps) -> float:
    """Median ms per call: GPU time from CUDA-graph replays on CUDA, wall clock on the CPU."""
    timer = time_fn_graph if device.type == "cuda" else time_fn
    return float(np.median(timer(fn, device, warmup, reps)["times_ms"]))


def run_sweep(device="cuda", shapes=None, variants=None, compiled: bool = True, warmup: int = 10,
              reps: int = 50, dtype=torch.bfloat16, seed: int = 0, log=print) -> list[dict]:
    """One record per (shape, provider or variant, mode); see the module docstring."""
    device = torch.device(device)
    shapes = shapes or (SHAPES if device.type == "cuda" else SMALL_SHAPES)
    variants = VARIANTS if variants is None else {k: VARIANTS[k] for k in variants}
    copy_gbps = copy_bandwidth(device)
    log(f"[gn_sweep] device copy bandwidth {copy_gbps:.1f} GB/s")
    common = dict(device=device.type, device_name=device_name(device), torch_version=torch.__version__,
                  git_commit=git_commit(), dtype=str(dtype).replace("torch.", ""), copy_gb_per_s=copy_gbps)
    records = []
    for k, shape in enumerate(shapes):
        x, w, b, dy = _inputs(shape, device, dtype, seed + k)
        n, e = x.numel(), x.element_size()
        nbytes = {"fwd": 2 * n * e, "full": 5 * n * e}
        ref = _outputs(_torch_gn, x, w, b, dy)
        providers = [("torch", _torch_gn, {})]
        if compiled:
            torch._dynamo.reset()
            providers.append(("compiled", torch.compile(_torch_gn, dynamic=False), {}))
        providers += [(name, _fused_gn, settings) for name, settings in variants.items()]
        for name, fn, settings in providers:
            with variant(settings):
                try:
                    diff = _rel_diff(_outputs(fn, x, w, b, dy), ref)
                    times = {mode: _time(call, device, warmup, reps) for mode, call in _calls(fn, x, w, b, dy).items()}
                    error = None
                except Exception as exc:  # a variant that cannot run at this shape is recorded, not fatal
                    diff, times, error = None, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            for mode in ("fwd", "full"):
                ms = times.get(mode)
                gbps = nbytes[mode] / (ms * 1e-3) / 1e9 if ms else None
                records.append(dict(shape="x".join(map(str, shape)), provider=name, mode=mode, median_ms=ms,
                                    gb_per_s=gbps, pct_copy_bw=100 * gbps / copy_gbps if gbps else None,
                                    max_rel_diff_vs_torch=diff, settings=settings, error=error, **common))
            log(f"[gn_sweep] {records[-1]['shape']} {name}: "
                + (error or f"fwd {times['fwd'] * 1e3:.1f} us, fwd+bwd {times['full'] * 1e3:.1f} us, diff {diff:.1e}"))
    return records


def summarise(records: list[dict]) -> list[dict]:
    """Per shape: the fastest variant of ours at fwd+bwd, its ms, % copy bandwidth and ratios to torch and
    compiled, and whether #14's targets hold."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in records):
        full = {r["provider"]: r for r in records if r["shape"] == shape and r["mode"] == "full" and r["median_ms"]}
        ours = {k: v for k, v in full.items() if k not in ("torch", "compiled")}
        if not ours:
            continue
        best = min(ours, key=lambda k: ours[k]["median_ms"])
        ms = ours[best]["median_ms"]
        vs_torch = full["torch"]["median_ms"] / ms if "torch" in full else None
        vs_compiled = full["compiled"]["median_ms"] / ms if "compiled" in full else None
        pct = ours[best]["pct_copy_bw"]
        out.append(dict(shape=shape, best=best, fwd_bwd_ms=ms, pct_copy_bw=pct, vs_torch=vs_torch,
                        vs_compiled=vs_compiled,
                        targets_met=bool(vs_torch and vs_torch >= TARGET_VS_TORCH and pct >= TARGET_PCT_COPY
                                         and (vs_compiled is None or vs_compiled > 1.0))))
    return out


COLUMNS = ("shape", "provider", "fwd us", "fwd+bwd us", "% copy BW (fwd+bwd)", "max rel diff")
SUMMARY_COLUMNS = ("shape", "best of ours", "fwd+bwd us", "% copy BW", "vs torch", "vs compiled", "#14 targets")


def format_markdown(records: list[dict]) -> str:
    r0 = records[0]
    header = (f"GroupNorm+SiLU sweep on {provenance(r0)}, {r0['dtype']} channels_last; copy bandwidth "
              f"{r0['copy_gb_per_s']:.0f} GB/s; median time per call "
              f"({'GPU time from CUDA-graph replays' if r0['device'] == 'cuda' else 'wall clock'})")
    by = {}
    for r in records:
        by.setdefault((r["shape"], r["provider"]), {})[r["mode"]] = r
    rows = []
    for (shape, provider), m in by.items():
        f, a = m.get("fwd", {}), m.get("full", {})
        if a.get("error"):
            rows.append([shape, provider, f"error: {a['error'][:80]}", "", "", ""])
        else:
            rows.append([shape, provider, f"{f['median_ms'] * 1e3:.1f}", f"{a['median_ms'] * 1e3:.1f}",
                         f"{a['pct_copy_bw']:.0f}%", f"{a['max_rel_diff_vs_torch']:.1e}"])
    summary = [[s["shape"], s["best"], f"{s['fwd_bwd_ms'] * 1e3:.1f}", f"{s['pct_copy_bw']:.0f}%",
                f"{s['vs_torch']:.2f}x", f"{s['vs_compiled']:.2f}x" if s["vs_compiled"] else "-",
                "met" if s["targets_met"] else "missed"] for s in summarise(records)]
    return markdown_table(header, COLUMNS, rows) + "\n" + markdown_table("Summary", SUMMARY_COLUMNS, summary)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbdm_fast.bench.gn_sweep", description=__doc__.splitlines()[0])
    add_output_args(p, json_help="write a JSON list, one record per (shape, variant or provider, mode)", device="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {','.join(VARIANTS)}")
    p.add_argument("--no-compiled", dest="compiled", action="store_false", help="skip torch.compile (one compile per shape)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run through the Triton interpreter)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    names = parse_names(args.variants, "--variants", tuple(VARIANTS), p.error, noun="variant")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.warmup < 0 or args.reps < 1:
        p.error("--warmup must be >= 0 and --reps >= 1")
    records = run_sweep(args.device, SMALL_SHAPES if args.small else None, names, args.compiled, args.warmup,
                        args.reps, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    publish(records, format_markdown(records), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
