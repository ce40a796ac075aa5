"""Side-by-side timing of one CBDM training step: the eager reference against the fused backends.

Backends (all on the same model initialisation, the same synthetic data, CBDM with tau 1.0 and the
default whole-batch label drop):
- ``eager``: ``draw_host`` + ``eager_step``, the step the Trainer runs: fp32, two forwards, host randomness,
  a host check of the loss, per-tensor EMA loop, plain ``torch.optim.Adam`` (the authors' step).
- ``fused``: the Trainer's fast step (``training.FastStep``): device draws + ``fused_step``, one 2B
  forward, foreach/fused Adam, clip and EMA lerp; fp32.
- ``compiled``: the same under torch.compile; on CUDA the whole step replayed as one CUDA graph (the
  benchmark's warm-up covers compilation, FastStep's warm-up steps and the capture).
- ``fused_bf16`` / ``compiled_bf16``: the same under bf16 autocast (fp32 master weights).
- ``*_ddp`` (``fused_ddp``, ``fused_bf16_ddp``, ``compiled_ddp``, ``compiled_bf16_ddp``): the same step as
  data-parallel training runs it (``training.FastStep`` over the model wrapped in DistributedDataParallel,
  draws from a draw generator, losses averaged over ranks), in a one-process group (NCCL on CUDA, gloo
  on CPU) that the benchmark creates. DDP's bucketed gradient all-reduce runs as in a real run; as in a
  real run there is no CUDA graph under DDP, unless ``ddp_cuda_graph`` (``--ddp-cuda-graph``, experimental)
  captures the compiled DDP step too (FastStep(cuda_graph=True) with the DDP forward). ``ratio_vs_no_ddp`` compares
  it with the same backend without DDP in the same run (the DDP overhead). Not in the default set: name
  them with --backends.
For the fast backends the layout is chosen by measurement (``channels_last="auto"``): both layouts
are timed in full and the faster one is reported; the record says which and gives the other's median.
Each fast backend runs once per kernel choice of ``kernels`` (``--kernels fused,inductor``: ours, or
torch's formulas that inductor compiles; auto as the Trainer resolves it, training/config.py
resolve_kernels); the record's ``kernels`` says which ran, ``kernels_why`` why (None for eager).

Method (common.time_steps): ``warmup`` untimed steps, then ``iters`` timed steps. CUDA: one pair of CUDA events per step
(synchronised before the loop and after it); CPU: ``time.perf_counter`` per step (the CPU step is
synchronous). Reported: median and p20/p80 step time, img/s = batch / median.

Peak memory (``peak_mem_bytes``): CUDA, ``torch.cuda.max_memory_allocated`` after a reset of the peak
statistics at the backend's start. CPU: the growth of the process's peak RSS (``ru_maxrss``) over the
backend's run. ru_maxrss is a process-wide high-water mark, so a backend that needs less than an
earlier backend's peak reports ~0: on CPU, compare memory only for the first backend run, or run one
backend per process (``--backends``).

FLOPs: ``FlopCounterMode`` over one forward of a batch at the benchmark size; a CBDM image costs two
passes, each a forward and a backward (3x the forward), so flops_per_step = 6 x forward FLOPs. The
count is nominal (an eager step whose batch had its labels dropped runs one pass). TFLOP/s =
flops_per_step / median; MFU = TFLOP/s / peak_tflops when a peak is given (default 790 on CUDA, the
H200 bf16 matrix peak of design/PERF.md; none on CPU).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cbdm_fast.model import UNet
from cbdm_fast.schedule import Schedule
from cbdm_fast.training.config import BACKENDS as STEP_BACKENDS, resolve_kernels
from cbdm_fast.training.draws import class_cdf, draw_device, draw_flags, draw_host
from cbdm_fast.training.fast_step import FastStep
from cbdm_fast.training.step import StepConfig, eager_step, make_optimizer, prepare_model, warmup_factor

from .common import (H200_BF16_PEAK_TFLOPS, device_name, git_commit, percentiles, provenance, record_tables,
                     time_steps, timestamp)
from .workload import (T, WorkloadConfig, count_forward_flops, long_tail_probs, model_config, model_defaults,
                       synthetic_batches, use_fast_cuda_math)

# the training step backends (training.config.BACKENDS), each fast one also under bf16 autocast:
# eager, fused, fused_bf16, compiled, compiled_bf16; and the fast ones under DDP
SINGLE_PROCESS = tuple(b + p for b in STEP_BACKENDS for p in (("",) if b == "eager" else ("", "_bf16")))
DDP_BACKENDS = tuple(b + "_ddp" for b in SINGLE_PROCESS if b != "eager")
BACKENDS = SINGLE_PROCESS + DDP_BACKENDS
FAST_WARMUP = 2  # FastStep's ordinary steps before the CUDA graph capture (inside the benchmark's warm-up)
LR, WARMUP_STEPS, LABEL_DROP = 2e-4, 5000, 0.1


@dataclass
class TrainBenchConfig(WorkloadConfig):
    iters: int = 5
    backends: tuple = BACKENDS
    channels_last: str = "auto"        # auto | on | off (fused backends; eager is always contiguous)
    peak_tflops: Optional[float] = None  # None: 790 on CUDA, no MFU on CPU
    seed: int = 0
    compile_mode: str = "default"      # torch.compile mode of the compiled backends (COMPILE_MODES)
    cuda_graph: bool = True            # compiled on CUDA: replay the whole step as a CUDA graph
    ddp_cuda_graph: bool = False       # compiled *_ddp on CUDA: the same under DDP (experimental)
    kernels: tuple = ("auto",)         # the fast backends' kernel choices (config.KERNEL_OPTIONS), each timed

    def resolved(self) -> "TrainBenchConfig":
        c = copy.copy(self)
        c.image_size, c.num_class = model_defaults(c.model, c.image_size, c.num_class)
        if c.peak_tflops is None and torch.device(c.device).type == "cuda":
            c.peak_tflops = H200_BF16_PEAK_TFLOPS
        return c


def parse_backend(backend: str) -> tuple[str, bool]:
    """'fused_bf16' -> ('fused', True); 'compiled' -> ('compiled', False); 'eager' -> ('eager', False);
    a ``_ddp`` backend parses as its single-process counterpart."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    kind, _, precision = without_ddp(backend).partition("_")
    return kind, precision == "bf16"


def uses_cuda_graph(backend: str, device: torch.device, cuda_graph: bool = True, ddp_cuda_graph: bool = False) -> bool:
    """Whether ``backend``'s step is replayed as one CUDA graph: compiled on CUDA, if allowed for its kind."""
    allowed = ddp_cuda_graph if backend.endswith("_ddp") else cuda_graph
    return bool(parse_backend(backend)[0] == "compiled" and torch.device(device).type == "cuda" and allowed)


def without_ddp(backend: str) -> str:
    """'compiled_bf16_ddp' -> 'compiled_bf16' (the same step without DDP)."""
    return backend[:-len("_ddp")] if backend.endswith("_ddp") else backend


class OneProcessGroup:
    """A process group of one rank for the ``_ddp`` backends (NCCL on CUDA, gloo on CPU), on a file store
    in a temporary folder; destroyed on exit if this created it. A group already initialised must be
    of one rank: the benchmark compares one process with and without DDP."""

    def __init__(self, device: torch.device):
        self.device, self.created, self._tmp = device, False, None

    def __enter__(self):
        import tempfile
        import torch.distributed as dist
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise ValueError(f"the _ddp backends time one process, but a process group of "
                                 f"{dist.get_world_size()} ranks is initialised: run the benchmark without torchrun")
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix="cbdm_bench_ddp_")
        store = dist.FileStore(str(Path(self._tmp.name) / "store"), 1)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        self.created = True
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        if self._tmp is not None:
            self._tmp.cleanup()


def kernels_for(backend: str, kernels: str, device) -> tuple[Optional[str], Optional[str]]:
    """(kernels, why) a backend runs with for the choice ``kernels`` (resolve_kernels); (None, None) for
    eager, which runs the authors' step on torch's kernels whatever the choice."""
    kind = parse_backend(backend)[0]
    if kind == "eager":
        return None, None
    return resolve_kernels(kernels, kind, torch.device(device).type)


def make_step(backend: str, base: UNet, batches, probs: torch.Tensor, device, channels_last: bool = False,
              seed: int = 0, compile_mode: str = "default", cuda_graph: bool = True,
              ddp_cuda_graph: bool = False, kernels: str = "auto") -> Callable[[], dict]:
    """A closure running one training step of ``backend`` on its own copy of ``base``, as the Trainer runs
    it (the step, then the warm-up scheduler).

    eager: the authors' step (draw_host + eager_step). fused*/compiled*: the Trainer's fast step
    (training.FastStep) on the kernels ``kernels`` resolves to (kernels_for), torch.compile for
    compiled (and on CUDA one CUDA graph per step after FAST_WARMUP steps).
    """
    kind, amp = parse_backend(backend)
    device = torch.device(device)
    model = copy.deepcopy(base).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(seed)  # the host draws of the eager path; the device draws of the fast ones
    choice = kernels_for(backend, kernels, device)[0] or "inductor"  # eager: torch's kernels, never patched
    cfg = StepConfig(method="cbdm", tau=1.0, amp=amp, channels_last=bool(kind != "eager" and channels_last),
                     kernels=choice)
    drop_p, cb = draw_flags("cbdm", LABEL_DROP)
    schedule = Schedule(T, device=device)
    state = {"i": 0}

    def next_batch():
        x_0, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        return x_0, y

    if kind == "eager":
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        probs_host = probs.to(torch.float64)

        def run_step(x_0, y):
            return eager_step(model, ema, opt, schedule, x_0, y, draw_host(x_0, probs_host, T, drop_p, cb), cfg)
    else:
        prepare_model(model, channels_last)
        prepare_model(ema, channels_last)
        graph = uses_cuda_graph(backend, device, cuda_graph, ddp_cuda_graph)
        opt = make_optimizer(model.parameters(), LR, device, capturable=graph)
        kwargs = dict(backend=kind, cuda_graph=graph, warmup=FAST_WARMUP,
                      compile_options=None if compile_mode == "default" else {"mode": compile_mode})
        generator = None
        if backend.endswith("_ddp"):  # as data-parallel training builds it (training.Trainer), in the one-process group
            from cbdm_fast import dist
            from cbdm_fast.training import ddp
            generator = torch.Generator(device=device).manual_seed(seed)
            side = torch.cuda.Stream(device) if graph else None  # DDP is built, warmed up and captured on it
            kwargs.update(loss=ddp.wrap_step(model, schedule, device, cfg, eager=False, stream=side),
                          reduce=dist.all_reduce_mean, side_stream=side,
                          generators=[generator] if graph else (),
                          warmup=ddp.DDP_GRAPH_WARMUP if graph else FAST_WARMUP)
        draw = functools.partial(draw_device, class_cdf=class_cdf(probs, device), T=T, drop_p=drop_p, cb=cb,
                                 generator=generator)
        run_step = FastStep(model, ema, opt, schedule, cfg, draw, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(WARMUP_STEPS))

    def step() -> dict:
        out = run_step(*next_batch())
        sched.step()
        return out
    return step


def run_train_bench(cfg: TrainBenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run every backend of ``cfg`` in turn; one record per backend (see the module docstring)."""
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    use_fast_cuda_math(device)
    mcfg = model_config(cfg.model, cfg.num_class)
    torch.manual_seed(cfg.seed)
    base = UNet(**mcfg)
    probs = long_tail_probs(cfg.num_class)
    batches = synthetic_batches(4, cfg.batch_size, cfg.image_size, probs, device, cfg.seed + 1)
    fwd_flops = count_forward_flops(base.to(device), *batches[0])
    base = base.cpu()
    flops_per_step = 6 * fwd_flops
    common = dict(device=device.type, device_name=device_name(device), batch_size=cfg.batch_size,
                  image_size=cfg.image_size, num_class=cfg.num_class, model_name=cfg.model, model=mcfg,
                  method="cbdm", tau=1.0, label_drop=LABEL_DROP, warmup=cfg.warmup, iters=cfg.iters,
                  num_threads=torch.get_num_threads() if device.type == "cpu" else None,
                  torch_version=torch.__version__, python_version=platform.python_version(),
                  git_commit=git_commit(), forward_flops=fwd_flops, flops_per_step=flops_per_step,
                  peak_tflops=cfg.peak_tflops, compile_mode=cfg.compile_mode,
                  peak_mem_kind="cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_growth")
    group = OneProcessGroup(device) if any(b.endswith("_ddp") for b in cfg.backends) else contextlib.nullcontext()
    with group:
        records = _time_backends(cfg, base, batches, probs, device, common, flops_per_step, log)
    eager = next((r for r in records if r["backend"] == "eager"), None)
    by_name = {(r["backend"], r["kernels"]): r for r in records}
    for r in records:
        if eager is not None:
            r["ratio_vs_eager"] = 1.0 if r is eager else r["img_per_s"] / eager["img_per_s"]
        plain = by_name.get((without_ddp(r["backend"]), r["kernels"])) if r["backend"].endswith("_ddp") else None
        r["ratio_vs_no_ddp"] = None if plain is None else r["img_per_s"] / plain["img_per_s"]
    return records


def _time_backends(cfg: TrainBenchConfig, base, batches, probs, device, common: dict, flops_per_step: int,
                   log: Callable[[str], None]) -> list[dict]:
    records = []
    for backend in cfg.backends:
        runs = {}  # the distinct kernels the choices resolve to (eager: one run on torch's kernels)
        for choice in cfg.kernels:
            kernels, why = kernels_for(backend, choice, device)
            runs.setdefault(kernels, (choice, why))
        for kernels, (choice, why) in runs.items():
            rec = _time_backend(cfg, backend, choice, base, batches, probs, device, common, flops_per_step, log)
            records.append(dict(rec, kernels=kernels, kernels_why=why))
    return records


def _time_backend(cfg: TrainBenchConfig, backend: str, kernels: str, base, batches, probs, device, common: dict,
                  flops_per_step: int, log: Callable[[str], None]) -> dict:
    """One record: ``backend`` on the kernel choice ``kernels``, in the faster (or the chosen) layout."""
    warmup = cfg.warmup
    if backend.startswith("compiled"):  # compilation, then FastStep's ordinary steps and the capture
        warmup = max(warmup, FAST_WARMUP + 2)
    if backend.startswith("compiled") and backend.endswith("_ddp") and cfg.ddp_cuda_graph:
        from cbdm_fast.training.ddp import DDP_GRAPH_WARMUP
        warmup = max(warmup, DDP_GRAPH_WARMUP + 2)
    if backend == "eager" or cfg.channels_last == "off":
        layouts = [False]
    elif cfg.channels_last == "on":
        layouts = [True]
    else:
        layouts = [False, True]
    trials = {}
    for cl in layouts:
        what = backend + (" channels_last" if cl else "") + ("" if backend == "eager" else f", kernels {kernels}")
        log(f"[bench] {what}: {warmup} warm-up + {cfg.iters} timed steps")
        step = make_step(backend, base, batches, probs, device, channels_last=cl, seed=cfg.seed,
                         compile_mode=cfg.compile_mode, cuda_graph=cfg.cuda_graph,
                         ddp_cuda_graph=cfg.ddp_cuda_graph, kernels=kernels)
        trials[cl] = time_steps(step, device, warmup, cfg.iters)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = min(trials, key=lambda cl: float(np.median(trials[cl]["times_ms"])))
    res = trials[best]
    stats = percentiles(res["times_ms"])
    med = stats["median_ms"]
    tflops = flops_per_step / (med * 1e-3) / 1e12
    return dict(backend=backend, **common, amp=parse_backend(backend)[1], ddp=backend.endswith("_ddp"),
                cuda_graph=uses_cuda_graph(backend, device, cfg.cuda_graph, cfg.ddp_cuda_graph),
                channels_last=best, **stats, img_per_s=cfg.batch_size / (med * 1e-3),
                ratio_vs_eager=None, tflops=tflops,
                mfu=(tflops / cfg.peak_tflops) if cfg.peak_tflops else None,
                peak_mem_bytes=res["peak_mem_bytes"], power_w=res["power_w"],
                gpu_util_pct=res["gpu_util_pct"], final_loss=res["final_loss"],
                layout_medians_ms={("channels_last" if cl else "contiguous"): float(np.median(r["times_ms"]))
                                   for cl, r in trials.items()},
                timestamp=timestamp())


# ----------------------------------------------------------------------------------------- output
_COLUMNS = ("backend", "img/s", "vs eager", "median ms", "p20/p80 ms", "peak mem MiB", "TFLOP/s", "MFU", "layout",
            "kernels")


def _row(r: dict) -> list[str]:
    ratio = "-" if r["ratio_vs_eager"] is None else f"{r['ratio_vs_eager']:.2f}x"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    name = r["backend"]
    if r.get("ratio_vs_no_ddp") is not None:  # the DDP overhead against the same step in one process
        name += f" ({100 * (1 / r['ratio_vs_no_ddp'] - 1):+.1f}% time vs {without_ddp(r['backend'])})"
    return [name, f"{r['img_per_s']:.2f}", ratio, f"{r['median_ms']:.1f}",
            f"{r['p20_ms']:.1f}/{r['p80_ms']:.1f}", f"{r['peak_mem_bytes'] / 2**20:.0f}",
            f"{r['tflops']:.3f}", mfu, "channels_last" if r["channels_last"] else "contiguous", r["kernels"] or "-"]


def _header(records: list[dict]) -> str:
    r = records[0]
    return (f"CBDM training step, {r['model_name']} UNet ({r['image_size']}x{r['image_size']}, "
            f"{r['num_class']} classes), batch {r['batch_size']}, {provenance(r)}; "
            f"median of {r['iters']} steps after {r['warmup']} warm-up; peak mem: {r['peak_mem_kind']}")


format_table, format_markdown = record_tables(_header, _COLUMNS, _row)
