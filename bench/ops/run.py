"""Running the op setups: every (setup, provider, mode) timed, one record each, and the markdown tables.

Modes: "fwd" (the training forward: autograd records the graph; the sampling steps, which have no
backward, run under no_grad), "bwd" (torch.autograd.grad of outputs from a forward done OUTSIDE the
timed region, retain_graph=True, with fixed random upstream gradients), "full" (forward + that
backward). ddpm_step / ddim_step only have "fwd". Defaults: dtype bf16 on CUDA, fp32 on CPU (the
extension's CPU path is fp32 only); layout channels_last (fp32 GroupNorm weight and bias; the sampling
steps are always contiguous).

Timing (common.py): ``warmup`` untimed calls, then ``reps`` timed calls; on CUDA a 256 MiB buffer is
zeroed before each call (outside the event pair) so the inputs are not served from L2, as
triton.testing.do_bench does. ``timing="graph"`` (CUDA only) measures GPU time alone from CUDA-graph
replays (common.time_fn_graph); a provider whose calls cannot be captured gets an ``error`` row.
Reported: median, p20, p80 in ms.

Peak memory (CUDA only; None on CPU): ``peak_mem_bytes`` = torch.cuda.max_memory_allocated over the
timed calls, after reset_peak_memory_stats, less the L2-flush buffer (so it includes the setup's inputs
and, in bwd mode, the graph saved by the forward); ``peak_mem_delta_bytes`` = that peak less the memory
allocated when the timed calls start (the op's own outputs and temporaries).

Bandwidth: gb_per_s = the setup's counted minimum bytes / median time (1 GB = 1e9 bytes); full = fwd +
bwd. The device copy bandwidth (dst.copy_(src) of a 1 GiB buffer on CUDA, 32 MiB on CPU: 2 x size bytes
per copy) is measured once per run; pct_copy_bw = gb_per_s / copy_gb_per_s x 100.

Correctness: each provider runs one forward (and backward) before its timing; the record's
``max_rel_diff_vs_torch`` is max over outputs and gradients of max|a - ref| / max|ref| (see
max_rel_diff), against the torch provider's (so rows compare like with like).
"""
from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from cbdm_fast import ops

from ..common import (L2_FLUSH_BYTES, copy_bandwidth, device_name, error_text, git_commit, percentiles, time_fn,
                      time_fn_graph, timestamp, triton_version)
from . import OPS, build_cases
from .case import DTYPE_NAMES, DTYPES, LAYOUTS, MODES, PROVIDERS, SIZES, OpCase, Runner

TIMINGS = ("eager", "graph")


@dataclass
class OpsBenchConfig:
    device: str = "cpu"
    ops: tuple = OPS
    providers: tuple = PROVIDERS
    modes: tuple = MODES
    size: Optional[str] = None          # None: train on CUDA, small on CPU
    dtype: Optional[str] = None         # None: bf16 on CUDA, fp32 on CPU
    layout: str = "channels_last"
    warmup: Optional[int] = None        # None: 10 on CUDA, 1 on CPU
    reps: Optional[int] = None          # None: 100 on CUDA, 5 on CPU
    flush_l2: bool = True
    timing: str = "eager"               # eager (per call, host time included) | graph (CUDA: GPU time only)
    copy_bytes: Optional[int] = None    # None: 1 GiB on CUDA, 32 MiB on CPU
    seed: int = 0

    def resolved(self) -> "OpsBenchConfig":
        """Defaults filled in; ValueError naming the field for an unknown name."""
        for name, values, allowed in (("ops", self.ops, OPS), ("providers", self.providers, PROVIDERS),
                                      ("modes", self.modes, MODES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name}: unknown {bad or '(none given)'}; choose from {', '.join(allowed)}")
        for name, v, allowed in (("size", self.size, SIZES), ("dtype", self.dtype, tuple(DTYPES)),
                                 ("layout", self.layout, LAYOUTS), ("timing", self.timing, TIMINGS)):
            if v is not None and v not in allowed:
                raise ValueError(f"{name}: unknown {v!r}; choose from {', '.join(allowed)}")
        c = copy.copy(self)
        cuda = torch.device(c.device).type == "cuda"
        if c.timing == "graph" and not cuda:
            raise ValueError("timing: graph (CUDA-graph replay) needs device cuda")
        c.size = c.size or ("train" if cuda else "small")
        c.dtype = c.dtype or ("bf16" if cuda else "fp32")
        c.warmup = (10 if cuda else 1) if c.warmup is None else c.warmup
        c.reps = (100 if cuda else 5) if c.reps is None else c.reps
        return c


# ----------------------------------------------------------------------------------------- modes

def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def forward(case: OpCase, runner: Runner) -> tuple:
    """One forward of ``runner`` (under no_grad when the op has no backward), as a tuple of outputs."""
    if runner.inputs:
        return as_tuple(runner.fn())
    with torch.no_grad():
        return as_tuple(runner.fn())


def gradients(case: OpCase, runner: Runner, outs: tuple) -> tuple:
    return torch.autograd.grad(outs, runner.inputs, case.grad_outputs, retain_graph=True)


def mode_fn(case: OpCase, runner: Runner, mode: str) -> Callable[[], Any]:
    """The callable timed for ``mode``: fwd runs the forward; bwd differentiates outputs of a forward
    run here, once (outside the timed region); full runs both."""
    if mode not in case.modes:
        raise ValueError(f"{case.op} has no {mode!r} mode (its modes: {', '.join(case.modes)})")
    if mode == "fwd":
        return lambda: forward(case, runner)
    if mode == "bwd":
        outs = forward(case, runner)
        return lambda: gradients(case, runner, outs)
    return lambda: torch.autograd.grad(forward(case, runner), runner.inputs, case.grad_outputs)


def reference_outputs(case: OpCase, runner: Runner) -> dict:
    """{"out": outputs, "grad": gradients (empty when the op has no backward)} of one call, detached,
    as float32."""
    outs = forward(case, runner)
    grads = gradients(case, runner, outs) if runner.inputs else ()
    return dict(out=tuple(o.detach().float() for o in outs), grad=tuple(g.detach().float() for g in grads))


def max_rel_diff(a: Sequence[Tensor], ref: Sequence[Tensor], floor: float = 1e-2) -> float:
    """max over the pairs of max|a - ref| / s, s = max|ref| of that tensor, but at least ``floor`` x the
    largest max|ref| of the sequence: a gradient that is zero in exact arithmetic (the key bias of
    attention) is then compared on its siblings' scale, not on its own rounding noise."""
    if len(a) != len(ref):
        raise ValueError(f"{len(a)} tensors against {len(ref)} reference tensors")
    for x, r in zip(a, ref):
        if x.shape != r.shape:
            raise ValueError(f"shape {tuple(x.shape)} against reference shape {tuple(r.shape)}")
    scales = [float(r.abs().max()) if r.numel() else 0.0 for r in ref]
    top = max(scales, default=0.0)
    worst = 0.0
    for x, r, s in zip(a, ref, scales):
        if r.numel() == 0:
            continue
        worst = max(worst, float((x - r).abs().max()) / max(s, floor * top, 1e-30))
    return worst


def diff_vs(got: dict, ref: dict) -> float:
    """max_rel_diff over the outputs and over the gradients of two reference_outputs results."""
    return max(max_rel_diff(got["out"], ref["out"]), max_rel_diff(got["grad"], ref["grad"]))


# ----------------------------------------------------------------------------------------- running

def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def empty_metrics() -> dict:
    return dict(median_ms=None, p20_ms=None, p80_ms=None, gb_per_s=None, pct_copy_bw=None, tflops=None,
                peak_mem_bytes=None, peak_mem_delta_bytes=None, speedup_vs_torch=None, bytes=None,
                max_rel_diff_vs_torch=None, times_ms=None)


def run_ops_bench(cfg: OpsBenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Every (op setup, provider, mode) of ``cfg``; one record each (see the module docstring)."""
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    copy_gbps = copy_bandwidth(device, cfg.copy_bytes)
    log(f"[ops] device copy bandwidth {copy_gbps:.1f} GB/s")
    # the L2-flush buffer only where it is used (eager timing): allocated under graph timing it would sit in
    # every record's peak memory, which time_fn_graph does not correct for
    flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
             if cuda and cfg.flush_l2 and cfg.timing == "eager" else None)
    common = dict(device=device.type, device_name=device_name(device), torch_version=torch.__version__,
                  triton_version=triton_version(), git_commit=git_commit(), size=cfg.size,
                  warmup=cfg.warmup, reps=cfg.reps, copy_gb_per_s=copy_gbps,
                  l2_flush=flush is not None, timing=cfg.timing,
                  extension=ops.extension_available(),
                  num_threads=torch.get_num_threads() if not cuda else None)
    records = []
    for op in cfg.ops:
        try:
            cases = build_cases(op, cfg.size, dtype, cfg.layout, device, cfg.seed)
        except Exception as e:  # a setup that cannot even be built: one error record per provider
            for p in cfg.providers:
                records.append(dict(op=op, shape=None, dtype=cfg.dtype, layout=cfg.layout, provider=p, mode=None,
                                    **empty_metrics(), **common, note=None, error=error_text(e),
                                    timestamp=timestamp()))
            continue
        for case in cases:
            records += _run_case(case, cfg, common, flush, copy_gbps, log)
            del case
            _free(device)
    _speedups(records)
    return records


def _run_case(case: OpCase, cfg: OpsBenchConfig, common: dict, flush, copy_gbps: float, log) -> list[dict]:
    device = case.device
    modes = [m for m in cfg.modes if m in case.modes]
    providers = list(cfg.providers)
    # the torch provider's outputs are the reference for every provider's max_rel_diff_vs_torch
    ref = None
    if "torch" not in providers:
        try:
            ref = reference_outputs(case, case.make("torch"))
        except Exception:
            ref = None
    records = []
    for provider in providers:
        base = dict(op=case.op, shape=case.shape_str, dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)),
                    layout=case.layout, provider=provider)
        runner, error, diff = None, None, None
        try:
            runner = case.make(provider)
            got = reference_outputs(case, runner)  # also the first call: compiles, surfaces errors
            if provider == "torch":
                ref = got
            elif ref is not None:
                diff = diff_vs(got, ref)
            del got
        except Exception as e:
            error = error_text(e)
        for mode in modes:
            rec = dict(base, mode=mode, **empty_metrics(), **common)
            rec["note"] = "; ".join(s for s in (case.note, runner.note if runner else None) if s) or None
            if error is not None:
                rec["error"] = error
            else:
                try:
                    log(f"[ops] {case.op} {case.shape_str} {provider} {mode}")
                    fn = mode_fn(case, runner, mode)
                    res = (time_fn_graph(fn, device, cfg.warmup, cfg.reps) if cfg.timing == "graph"
                           else time_fn(fn, device, cfg.warmup, cfg.reps, flush))
                    stats = percentiles(res["times_ms"])
                    nbytes = case.bytes[mode]
                    gbps = nbytes / (stats["median_ms"] * 1e-3) / 1e9
                    rec.update(stats, bytes=nbytes, gb_per_s=gbps, pct_copy_bw=100.0 * gbps / copy_gbps,
                               tflops=(case.flops[mode] / (stats["median_ms"] * 1e-3) / 1e12) if case.flops else None,
                               peak_mem_bytes=res["peak_mem_bytes"],
                               peak_mem_delta_bytes=res["peak_mem_delta_bytes"], max_rel_diff_vs_torch=diff)
                except Exception as e:
                    rec["error"] = error_text(e)
                _free(device)
            rec["timestamp"] = timestamp()
            records.append(rec)
        del runner
        _free(device)
    return records


def _speedups(records: list[dict]) -> None:
    torch_ms = {(r["op"], r["shape"], r["mode"]): r["median_ms"] for r in records
                if r["provider"] == "torch" and r["median_ms"]}
    for r in records:
        t = torch_ms.get((r["op"], r["shape"], r["mode"]))
        if t is not None and r["median_ms"]:
            r["speedup_vs_torch"] = t / r["median_ms"]


# ----------------------------------------------------------------------------------------- output

COLUMNS = ("mode", "provider", "median ms", "p20/p80 ms", "GB/s", "% copy BW", "peak MiB", "vs torch",
           "max rel diff")


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _row(r: dict) -> list[str]:
    if r.get("error"):
        msg = r["error"].replace("|", "/")
        return [r["mode"] or "-", r["provider"], f"error: {msg[:160]}"] + [""] * (len(COLUMNS) - 3)
    gbps = _fmt(r["gb_per_s"], ".1f")
    if r.get("tflops") is not None:
        gbps += f" ({r['tflops']:.2f} TFLOP/s)"
    peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2 ** 20:.0f}"
    p = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.4f}/{r['p80_ms']:.4f}"
    return [r["mode"], r["provider"], _fmt(r["median_ms"], ".4f"), p, gbps, _fmt(r["pct_copy_bw"], ".0f", "%"),
            peak, _fmt(r["speedup_vs_torch"], ".2f", "x"), _fmt(r["max_rel_diff_vs_torch"], ".1e")]


def format_markdown(records: list[dict]) -> str:
    """Markdown: a header (device, versions, commit, copy bandwidth), then one table per op setup with
    its rows grouped by mode (fwd, bwd, full) and provider."""
    if not records:
        return "No records.\n"
    r0 = records[0]
    lines = [f"Per-op benchmark on {r0['device']} ({r0['device_name']}), torch {r0['torch_version']}, "
             f"triton {r0['triton_version'] or 'n/a'}, commit {(r0['git_commit'] or 'unknown')[:12]}, "
             f"{r0['timestamp']}; size {r0['size']}, median of {r0['reps']} after {r0['warmup']} warm-up"
             f"{', L2 flushed before each call' if r0['l2_flush'] else ''}"
             f"{'; GPU time per call from CUDA-graph replays' if r0.get('timing') == 'graph' else ''}; "
             f"device copy bandwidth {r0['copy_gb_per_s']:.1f} GB/s.", ""]
    groups: dict = {}
    for r in records:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["layout"]), []).append(r)
    mode_rank = {m: i for i, m in enumerate(MODES)}
    prov_rank = {p: i for i, p in enumerate(PROVIDERS)}
    for (op, shape, dt, layout), rows in groups.items():
        note = next((r.get("note") for r in rows if r.get("note")), None)
        lines.append(f"### {op} {shape or ''} {dt} {layout}".rstrip())
        if note:
            lines.append(f"({note})")
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        rows = sorted(rows, key=lambda r: (mode_rank.get(r["mode"], 9), prov_rank.get(r["provider"], 9)))
        lines += ["| " + " | ".join(_row(r)) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)
