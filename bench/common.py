"""What every benchmark shares: the timing loops, the record fields that name the machine and the commit,
and the output (a JSON list of records, text and markdown tables).

Timing: ``warmup`` untimed calls, then one measurement per timed call. CUDA: a pair of CUDA events around
each call, synchronised before and after the loop; CPU: ``time.perf_counter`` around each call (the CPU
work is synchronous). ``time_fn_graph`` measures GPU time alone, from CUDA-graph replays of GRAPH_CALLS
calls. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, the training and sampling
steps report the growth of the process's peak RSS (a process-wide high-water mark, so meaningful for the
first backend of a run only) and the per-op calls report none.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

H200_BF16_PEAK_TFLOPS = 790.0    # the MFU peak on CUDA unless --peak-tflops says otherwise (design/PERF.md)
L2_FLUSH_BYTES = 256 * 2 ** 20   # zeroed before each timed op call so its inputs are not served from L2
GRAPH_CALLS = 20                 # calls per CUDA-graph replay in time_fn_graph


# ----------------------------------------------------------------------------------------- timing

def _timed_calls(fn: Callable[[], Any], device: torch.device, reps: int,
                 before: Optional[Callable[[], Any]] = None) -> tuple[list[float], Any]:
    """Milliseconds of each of ``reps`` calls of ``fn`` (``before()`` runs untimed ahead of each), and the
    last call's result."""
    out = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in events:
            if before is not None:
                before()
            a.record()
            out = fn()
            b.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in events], out
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int,
            flush: Optional[Tensor] = None) -> dict:
    """``warmup`` untimed calls then ``reps`` timed calls: times_ms and, on CUDA, the peak memory of the
    timed calls (less the ``flush`` buffer zeroed before each) and its growth over what was allocated
    when they started (None on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return dict(times_ms=_timed_calls(fn, device, reps)[0], peak_mem_bytes=None, peak_mem_delta_bytes=None)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    times, _ = _timed_calls(fn, device, reps, None if flush is None else flush.zero_)
    peak = torch.cuda.max_memory_allocated(device)
    flush_bytes = flush.numel() * flush.element_size() if flush is not None else 0
    return dict(times_ms=times, peak_mem_bytes=int(peak - flush_bytes), peak_mem_delta_bytes=int(peak - base))


def time_fn_graph(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict:
    """GPU time per call: after the warm-up (on a side stream, as capture requires), GRAPH_CALLS calls are
    captured in one CUDA graph and each timed repeat is one replay divided by GRAPH_CALLS. No L2 flush
    between the calls of a replay. Per-call timing includes the host's launch and autograd time, which
    dominates microsecond kernels on a slow host; this is what they cost inside a graphed step."""
    if device.type != "cuda":
        raise ValueError("graph timing needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    times, _ = _timed_calls(graph.replay, device, reps)
    peak = torch.cuda.max_memory_allocated(device)
    del graph
    return dict(times_ms=[t / GRAPH_CALLS for t in times], peak_mem_bytes=int(peak),
                peak_mem_delta_bytes=int(peak - base))


def copy_bandwidth(device, nbytes: Optional[int] = None, warmup: Optional[int] = None,
                   reps: Optional[int] = None) -> float:
    """Device copy bandwidth in GB/s: dst.copy_(src) of ``nbytes`` (default 1 GiB on CUDA, 32 MiB on
    CPU) moves 2 x nbytes; median over ``reps`` (default 20 on CUDA, 5 on CPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    warmup = (3 if cuda else 1) if warmup is None else warmup
    reps = (20 if cuda else 5) if reps is None else reps
    if nbytes is None:
        nbytes = 2 ** 30 if cuda else 32 * 2 ** 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med = float(np.median(time_fn(lambda: dst.copy_(src), device, warmup, reps)["times_ms"]))
    return 2 * nbytes / (med * 1e-3) / 1e9


class NvmlSampler:
    """Mean power (W) and GPU utilisation (%) sampled every 50 ms on a thread; no-op without pynvml."""

    def __init__(self, device: torch.device):
        self.power, self.util, self._stop, self._thread, self._h, self._nvml = [], [], None, None, None, None
        if device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py, imported lazily: optional, CUDA only
            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def _run(self):
        while not self._stop.is_set():
            try:
                self.power.append(self._nvml.nvmlDeviceGetPowerUsage(self._h) / 1000.0)
                self.util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu))
            except Exception:
                pass
            self._stop.wait(0.05)

    def __enter__(self):
        if self._nvml is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def result(self):
        mean = lambda v: float(np.mean(v)) if v else None
        return mean(self.power), mean(self.util)


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def time_steps(step: Callable[[], dict], device: torch.device, warmup: int, iters: int) -> dict:
    """Warm-up, then ``iters`` timed steps: per-step times in ms, peak memory (over the warm-up too),
    mean power and utilisation, and the last step's loss when it returns one."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _peak_rss_bytes()
    out = None
    for _ in range(warmup):
        out = step()
    sampler = NvmlSampler(device)
    with sampler:
        times, last = _timed_calls(step, device, iters)
    out = last if iters else out
    peak = torch.cuda.max_memory_allocated(device) if cuda else max(0, _peak_rss_bytes() - rss0)
    power, util = sampler.result()
    loss = float(out["loss"]) if out is not None else None
    return dict(times_ms=times, peak_mem_bytes=int(peak), power_w=power, gpu_util_pct=util, final_loss=loss)


def percentiles(times_ms) -> dict:
    """median_ms, p20_ms, p80_ms and the times themselves, as floats."""
    t = np.asarray(times_ms)
    return dict(median_ms=float(np.median(t)), p20_ms=float(np.percentile(t, 20)),
                p80_ms=float(np.percentile(t, 80)), times_ms=[float(v) for v in t])


# ----------------------------------------------------------------------------------------- records

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """HEAD's hash, or $CBDM_GIT_COMMIT when the code runs from an archive without .git (e.g. on a lent GPU)."""
    env = os.environ.get("CBDM_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def triton_version() -> Optional[str]:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def timestamp() -> str:
    """Now, UTC, to the second (every record's ``timestamp``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def error_text(e: BaseException) -> str:
    """An exception as one short line for a record's ``error``."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


# ----------------------------------------------------------------------------------------- output

def write_records(records: list[dict], json_path, markdown_path: Optional[str] = None,
                  markdown: Optional[str] = None) -> None:
    """``records`` as an indented JSON list at ``json_path``; ``markdown`` (text) at ``markdown_path``."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    if markdown_path:
        md = Path(markdown_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown if markdown is not None else "")


def record_tables(header_of: Callable[[list], str], columns: tuple, row_of: Callable[[dict], list]):
    """(format_table, format_markdown) for one benchmark: records -> a text table for the terminal and a
    markdown table for RESULTS.md, both with the header ``header_of(records)`` and a row per record."""
    def format_table(records: list) -> str:
        return text_table(header_of(records), columns, [row_of(r) for r in records])

    def format_markdown(records: list) -> str:
        return markdown_table(header_of(records), columns, [row_of(r) for r in records])
    return format_table, format_markdown


def publish(records: list[dict], text: str, json_path, markdown_path: Optional[str] = None) -> None:
    """Print a benchmark's table and write its records (write_records)."""
    print(text)
    write_records(records, json_path, markdown_path, text)


def provenance(r: dict) -> str:
    """Where a record was measured, for table headers: device (its name), torch version, short commit."""
    return (f"{r['device']} ({r['device_name']}), torch {r['torch_version']}, "
            f"commit {(r['git_commit'] or 'unknown')[:12]}")


def text_table(header: str, columns: tuple, rows: list[list[str]], left: int = 1) -> str:
    """``header``, then the rows aligned under ``columns`` (the first ``left`` columns left-aligned)."""
    rows = [list(columns)] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [header]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: str, columns: tuple, rows: list[list[str]]) -> str:
    """``header``, a blank line, and a markdown table."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
