"""Side-by-side timing of one guided sampling step: the authors' reference sampler against ours.

Backends (same model initialisation, same labels, classifier-free guidance with ``omega`` > 0 so
every step is a guided one):
- ``reference``: one step of the authors' loop (``samplers.ddpm_sample``'s body as ``ReferenceSampler``
  runs it): fp32, two forwards (conditional, unconditional), the torch step formula, ``torch.randn``
  noise; Python loop.
- ``fast``: ``FastSampler`` run eagerly: one forward of 2B with the label mask, per-sample counter
  noise, the extension's step; bf16 autocast on CUDA (fp32 on CPU).
- ``fast_bf16``: the same under bf16 autocast on the CPU (CPU only; AMX/AVX512-BF16 where present).
- ``fast_graph``: ``FastSampler`` with the whole step captured once as a CUDA graph and replayed
  (CUDA only; the timestep comes from a device counter, so a replay is the only host work).
- ``fast_compiled``: ``fast_graph`` with the UNet under torch.compile (CUDA only; the compilation
  happens in the warm-up steps before the capture).

The fast backends run each sampler of ``samplers`` (the step op: ddpm_step over T = 1000 steps,
ddim_step over 100, dpm_step over 20 -- SAMPLE_STEPS), one row per (sampler, fast backend) after the
reference row, so one run gives e.g. DDPM-1000 and DPM-Solver++-20 samples/s side by side.

Method: ``warmup`` untimed steps, then ``steps_timed`` timed steps (``common.time_steps``: CUDA
events per step on CUDA, ``time.perf_counter`` on CPU). Reported per row: ms_per_step median and
p20/p80; steps_per_s = 1000 / median (guided steps of the whole batch per second);
samples_per_s_1000 = steps_per_s * batch / 1000 (1000-step guided samples per second),
samples_per_s_ddim100 = steps_per_s * batch / 100 and samples_per_s = steps_per_s * batch /
sample_steps (whole samples per second of the row's sampler); ratio vs the reference in the same run; peak
memory (see common.py: CUDA max_memory_allocated, CPU peak-RSS growth, meaningful for the first
backend only). TFLOP/s counts two forwards of B images per step (FlopCounterMode); MFU against
``peak_tflops`` (default 790 on CUDA, the H200 bf16 peak of design/PERF.md).
"""
from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from cbdm_fast import ops
from cbdm_fast.model import UNet
from cbdm_fast.samplers import FastSampler, guided_eps
from cbdm_fast.schedule import Schedule

from .common import H200_BF16_PEAK_TFLOPS, device_name, git_commit, percentiles, provenance, record_tables, \
    time_steps, timestamp
from .workload import T, WorkloadConfig, count_forward_flops, model_config, model_defaults, use_fast_cuda_math

BACKENDS = ("reference", "fast", "fast_bf16", "fast_graph", "fast_compiled")
CPU_DEFAULT = ("reference", "fast", "fast_bf16")
CUDA_DEFAULT = ("reference", "fast", "fast_graph", "fast_compiled")
SAMPLE_STEPS = {"ddpm": T, "ddim": 100, "dpm++2m": 20}  # model evaluations of one sample, per sampler


@dataclass
class SampleBenchConfig(WorkloadConfig):
    steps_timed: int = 5
    backends: Optional[tuple] = None   # None: CPU_DEFAULT or CUDA_DEFAULT
    samplers: tuple = ("ddpm",)        # the fast backends' samplers (step ops ddpm_step, ddim_step, dpm_step)
    omega: float = 1.6
    channels_last: bool = False        # fast backends
    patch: bool = False                # fast backends: cbdm_fast.nn.patch_model (fused GroupNorm+SiLU, attention)
    peak_tflops: Optional[float] = None
    seed: int = 0

    def resolved(self) -> "SampleBenchConfig":
        c = copy.copy(self)
        c.image_size, c.num_class = model_defaults(c.model, c.image_size, c.num_class)
        cuda = torch.device(c.device).type == "cuda"
        if c.backends is None:
            c.backends = CUDA_DEFAULT if cuda else CPU_DEFAULT
        if c.peak_tflops is None and cuda:
            c.peak_tflops = H200_BF16_PEAK_TFLOPS
        return c


def check_backends(backends, device: str) -> None:
    cuda = torch.device(device).type == "cuda"
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        if b in ("fast_graph", "fast_compiled") and not cuda:
            raise ValueError(f"backend {b} (CUDA-graph replay) needs --device cuda")
        if b == "fast_bf16" and cuda:
            raise ValueError("backend fast_bf16 is the CPU's bf16 variant; on CUDA, fast and fast_graph use bf16")


def make_step(backend: str, base: UNet, schedule: Schedule, y: torch.Tensor, shape, cfg: SampleBenchConfig,
              sampler: str = "ddpm") -> Callable[[], None]:
    """A closure running one guided step of ``backend`` (``sampler``'s, for the fast ones) for the batch (its
    own copy of ``base``)."""
    device = y.device
    model = copy.deepcopy(base).to(device).eval()
    B = y.shape[0]
    if backend == "reference":
        table = schedule.sampling_table("fixedlarge").to(device)
        state = {"x": torch.randn((B,) + tuple(shape), device=device), "k": 0}

        @torch.no_grad()
        def step():
            t = torch.full((B,), T - 1 - state["k"] % T, dtype=torch.long, device=device)
            state["k"] += 1
            x = state["x"]
            eps_c, eps_u = guided_eps(model, x, t, y, cfg.omega, "cfg")
            noise = torch.randn(x.shape, device=device)
            state["x"] = ops.ddpm_step(x, eps_c.float(), eps_u.float(), t, noise, table, omega=cfg.omega,
                                       backend="reference")
        return step
    amp = {"fast": None, "fast_bf16": True, "fast_graph": None, "fast_compiled": None}[backend]
    graph = backend in ("fast_graph", "fast_compiled")
    sampler = FastSampler(model, schedule, shape, seed=cfg.seed, sampler=sampler,
                          steps=None if sampler == "ddpm" else SAMPLE_STEPS[sampler], omega=cfg.omega, method="cfg",
                          amp=amp, cuda_graph=graph if device.type == "cuda" else False,
                          channels_last=cfg.channels_last, patch=cfg.patch, compile=backend == "fast_compiled")
    sampler.start(y, torch.arange(B, device=device))

    @torch.no_grad()
    def step():
        sampler.run_step(B)
    return step


def run_sample_bench(cfg: SampleBenchConfig, log: Callable[[str], None] = print) -> list:
    """Run every backend of ``cfg`` in turn; one record per backend (see the module docstring)."""
    cfg = cfg.resolved()
    check_backends(cfg.backends, cfg.device)
    device = torch.device(cfg.device)
    use_fast_cuda_math(device)
    mcfg = model_config(cfg.model, cfg.num_class)
    torch.manual_seed(cfg.seed)
    base = UNet(**mcfg).eval()
    shape = (3, cfg.image_size, cfg.image_size)
    y = torch.randint(cfg.num_class, (cfg.batch_size,), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    x = torch.zeros((cfg.batch_size,) + shape, device=device)
    fwd_flops = count_forward_flops(base.to(device), x, y)
    base = base.cpu()
    flops_per_step = 2 * fwd_flops
    schedule = Schedule(T, device=device)
    common = dict(device=device.type, device_name=device_name(device), batch_size=cfg.batch_size,
                  image_size=cfg.image_size, num_class=cfg.num_class, model_name=cfg.model, model=mcfg,
                  omega=cfg.omega, warmup=cfg.warmup, steps_timed=cfg.steps_timed,
                  num_threads=torch.get_num_threads() if device.type == "cpu" else None,
                  torch_version=torch.__version__, python_version=platform.python_version(),
                  git_commit=git_commit(), forward_flops=fwd_flops, flops_per_step=flops_per_step,
                  peak_tflops=cfg.peak_tflops,
                  peak_mem_kind="cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_growth")
    records = []
    rows = [(b, "ddpm") for b in cfg.backends if b == "reference"]  # the authors' ancestral step
    rows += [(b, sampler) for sampler in cfg.samplers for b in cfg.backends if b != "reference"]
    for backend, sampler in rows:
        log(f"[bench] {backend} ({sampler}): {cfg.warmup} warm-up + {cfg.steps_timed} timed guided steps, "
            f"batch {cfg.batch_size}")
        step = make_step(backend, base, schedule, y, shape, cfg, sampler)
        res = time_steps(step, device, cfg.warmup, cfg.steps_timed)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stats = percentiles(res["times_ms"])
        med = stats["median_ms"]
        steps_per_s = 1e3 / med
        tflops = flops_per_step / (med * 1e-3) / 1e12
        fast = backend != "reference"
        rec = dict(backend=backend, sampler=sampler, **common,
                   amp=bool(fast and (backend == "fast_bf16" or device.type == "cuda")),
                   cuda_graph=backend in ("fast_graph", "fast_compiled"), compiled=backend == "fast_compiled",
                   channels_last=bool(fast and cfg.channels_last),
                   patched=bool(fast and cfg.patch),
                   forwards_per_step=1 if fast else 2,
                   ms_per_step=med, p20_ms=stats["p20_ms"], p80_ms=stats["p80_ms"], times_ms=stats["times_ms"],
                   steps_per_s=steps_per_s,
                   samples_per_s_1000=steps_per_s * cfg.batch_size / 1000,
                   samples_per_s_ddim100=steps_per_s * cfg.batch_size / 100,
                   sample_steps=SAMPLE_STEPS[sampler],
                   samples_per_s=steps_per_s * cfg.batch_size / SAMPLE_STEPS[sampler],
                   ratio_vs_reference=None, tflops=tflops,
                   mfu=(tflops / cfg.peak_tflops) if cfg.peak_tflops else None,
                   peak_mem_bytes=res["peak_mem_bytes"], power_w=res["power_w"], gpu_util_pct=res["gpu_util_pct"],
                   timestamp=timestamp())
        records.append(rec)
    ref = next((r for r in records if r["backend"] == "reference"), None)
    for r in records:
        if ref is not None:
            r["ratio_vs_reference"] = 1.0 if r is ref else r["steps_per_s"] / ref["steps_per_s"]
    return records


# ----------------------------------------------------------------------------------------- output
_COLUMNS = ("backend", "sampler", "steps/s", "vs reference", "ms/step", "p20/p80 ms", "samples/s (1000 steps)",
            "samples/s (DDIM-100)", "samples/s (its steps)", "peak mem MiB", "TFLOP/s", "MFU")


def _row(r: dict) -> list:
    ratio = "-" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return [r["backend"], f"{r['sampler']}-{r['sample_steps']}", f"{r['steps_per_s']:.2f}", ratio,
            f"{r['ms_per_step']:.2f}", f"{r['p20_ms']:.2f}/{r['p80_ms']:.2f}", f"{r['samples_per_s_1000']:.3f}",
            f"{r['samples_per_s_ddim100']:.2f}", f"{r['samples_per_s']:.2f}", f"{r['peak_mem_bytes'] / 2**20:.0f}",
            f"{r['tflops']:.3f}", mfu]


def _header(records: list) -> str:
    r = records[0]
    samplers = ", ".join(dict.fromkeys(f"{x['sampler']}" for x in records))
    return (f"Guided sampling step (omega {r['omega']:g}; samplers {samplers}), {r['model_name']} UNet "
            f"({r['image_size']}x{r['image_size']}, {r['num_class']} classes), batch {r['batch_size']}, "
            f"{provenance(r)}; median of {r['steps_timed']} steps after {r['warmup']} "
            f"warm-up; peak mem: {r['peak_mem_kind']}")


format_table, format_markdown = record_tables(_header, _COLUMNS, _row)
