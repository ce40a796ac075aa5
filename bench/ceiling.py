"""The matrix floor of a CBDM step: how fast a step could be if nothing but its convolutions and linear
layers took time, in each precision, on this machine; and so the best speed-up any backend can reach.

Why: convolutions are 97% of the UNet's FLOPs (design/PERF.md). A target ratio over the eager reference
is reachable only if the reference's time divided by the fast step's unavoidable matrix time is at least
that ratio. On a CPU without AMX, bf16 (avx512_bf16) only doubles the fp32 rate, which caps every
backend near 2x-2.7x whatever is fused; this benchmark measures that cap instead of arguing it.

Method:
1. One forward of the UNet on the fast step's batch (2B images: the conditional and the re-sampled /
   unconditional halves) with forward hooks on every ``nn.Conv2d`` and ``nn.Linear`` records each call:
   the layer, its input shape, and whether its input needs a gradient (the first convolution's does not).
2. Those calls are replayed in isolation on random data, the weights cast to the dtype (what autocast
   feeds the kernels): ``train`` = each layer's forward and its backward (``aten.convolution_backward``
   with the gradients the step needs: input where required, weight, bias; for a linear layer the two
   GEMMs and the bias sum); ``sample`` = the forwards only.
3. ``warmup`` untimed passes, then ``iters`` timed passes over all layers (CUDA events on a GPU,
   ``perf_counter`` on a CPU); the floor is the median pass time. On a GPU one pass is captured as a
   CUDA graph and replayed, so the floor is the kernels' time, not the host's launching them (the fast
   steps replay CUDA graphs too).
4. In the same run the reference step is timed (``train``: the eager step of bench train, fp32, two
   forwards and a backward through both; ``sample``: one step of the reference sampler, two forwards).

Reported per (work, dtype): floor_ms, the matrix FLOPs counted from the shapes and the rate they ran at,
the reference step's median ms, and ``max_ratio`` = reference_ms / floor_ms, an upper bound on the
speed-up of ANY backend that runs those layers through the same kernels in that dtype (it still has
normalisation, attention, elementwise work and the optimizer to do).
"""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cbdm_fast.model import UNet
from cbdm_fast.schedule import Schedule

from .common import device_name, git_commit, markdown_table, provenance, text_table, time_fn, time_steps, timestamp
from .workload import (T, WorkloadConfig, long_tail_probs, model_config, model_defaults, synthetic_batches,
                       use_fast_cuda_math)

WORKS = ("train", "sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class CeilingBenchConfig(WorkloadConfig):
    iters: int = 5
    works: tuple = WORKS
    dtypes: tuple = ("fp32", "bf16")
    channels_last: bool = False
    seed: int = 0


@dataclass
class LayerCall:
    """One matrix layer's call in the forward: the module and the shape of its input."""
    module: torch.nn.Module
    input_shape: tuple
    needs_input_grad: bool


def record_calls(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[LayerCall]:
    """Every Conv2d / Linear call of one forward, in order (the layers whose parameters train)."""
    calls, hooks = [], []

    def hook(module, inputs, _output):
        calls.append(LayerCall(module, tuple(inputs[0].shape), bool(inputs[0].requires_grad)))

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(x, t, y=y)
    finally:
        for h in hooks:
            h.remove()
    return calls


def call_flops(call: LayerCall, backward: bool) -> int:
    """2 x multiply-adds of the forward; a backward adds one GEMM per gradient (input, weight)."""
    m = call.module
    if isinstance(m, torch.nn.Conv2d):
        n, _, h, w = call.input_shape
        kh, kw = m.kernel_size
        ho = (h + 2 * m.padding[0] - m.dilation[0] * (kh - 1) - 1) // m.stride[0] + 1
        wo = (w + 2 * m.padding[1] - m.dilation[1] * (kw - 1) - 1) // m.stride[1] + 1
        fwd = 2 * n * m.out_channels * ho * wo * (m.in_channels // m.groups) * kh * kw
    else:
        rows = int(np.prod(call.input_shape[:-1]))
        fwd = 2 * rows * m.in_features * m.out_features
    if not backward:
        return fwd
    return fwd * (2 + int(call.needs_input_grad))


class _Replay:
    """The recorded calls' tensors in one dtype and layout, and one pass over them."""

    def __init__(self, calls: list[LayerCall], dtype: torch.dtype, device: torch.device, channels_last: bool,
                 backward: bool, seed: int):
        g = torch.Generator(device="cpu").manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.backward, self.items = backward, []
        for c in calls:
            m = c.module
            x = torch.randn(c.input_shape, generator=g).to(device=device, dtype=dtype)
            w = m.weight.detach().to(device=device, dtype=dtype)
            b = None if m.bias is None else m.bias.detach().to(device=device, dtype=dtype)
            if isinstance(m, torch.nn.Conv2d):
                x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            out = self._forward(m, x, w, b)
            grad = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
            if isinstance(m, torch.nn.Conv2d):
                grad = grad.contiguous(memory_format=fmt)
            self.items.append((m, x, w, b, grad, c.needs_input_grad))

    @staticmethod
    def _forward(m, x, w, b):
        if isinstance(m, torch.nn.Conv2d):
            return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, b)

    @torch.no_grad()
    def run(self) -> None:
        for m, x, w, b, grad, needs_gx in self.items:
            self._forward(m, x, w, b)
            if not self.backward:
                continue
            if isinstance(m, torch.nn.Conv2d):
                torch.ops.aten.convolution_backward(grad, x, w, [w.shape[0]] if b is not None else None,
                                                    list(m.stride), list(m.padding), list(m.dilation), False,
                                                    [0, 0], m.groups, [needs_gx, True, b is not None])
            else:
                g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
                if needs_gx:
                    g2 @ w
                g2.t() @ x2
                if b is not None:
                    g2.sum(0)


def graphed(run: Callable[[], None], warmup: int) -> Callable[[], None]:
    """``run`` captured once as a CUDA graph (after warm-up passes on a side stream, which also let
    cuDNN pick its algorithms); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def reference_times(work: str, cfg: CeilingBenchConfig, base: UNet, device: torch.device) -> list[float]:
    """Per-step ms of the reference: the eager training step, or one reference guided sampling step."""
    if work == "train":
        from .train import make_step
        probs = long_tail_probs(cfg.num_class)
        batches = synthetic_batches(2, cfg.batch_size, cfg.image_size, probs, device, cfg.seed + 1)
        step = make_step("eager", base, batches, probs, device, seed=cfg.seed)
    else:
        from .sample import SampleBenchConfig, make_step as make_sample_step
        scfg = SampleBenchConfig(device=cfg.device, batch_size=cfg.batch_size, model=cfg.model, seed=cfg.seed)
        y = torch.randint(cfg.num_class, (cfg.batch_size,), generator=torch.Generator().manual_seed(cfg.seed))
        shape = (3, cfg.image_size, cfg.image_size)
        step = make_sample_step("reference", base, Schedule(T, device=device), y.to(device), shape, scfg)
    return time_steps(step, device, cfg.warmup, cfg.iters)["times_ms"]


def run_ceiling_bench(cfg: CeilingBenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """One record per (work, dtype); see the module docstring."""
    image_size, num_class = model_defaults(cfg.model, cfg.image_size, cfg.num_class)
    cfg = dataclasses.replace(cfg, image_size=image_size, num_class=num_class)
    device = torch.device(cfg.device)
    use_fast_cuda_math(device)
    torch.manual_seed(cfg.seed)
    base = UNet(**model_config(cfg.model, cfg.num_class))
    B2 = 2 * cfg.batch_size
    x = torch.randn(B2, 3, cfg.image_size, cfg.image_size)
    calls = record_calls(base, x, torch.zeros(B2, dtype=torch.long), torch.zeros(B2, dtype=torch.long))
    common = dict(device=device.type, device_name=device_name(device), batch_size=cfg.batch_size,
                  image_size=cfg.image_size, num_class=cfg.num_class, model_name=cfg.model,
                  layers=len(calls), channels_last=cfg.channels_last, warmup=cfg.warmup, iters=cfg.iters,
                  num_threads=torch.get_num_threads() if device.type == "cpu" else None,
                  torch_version=torch.__version__, python_version=platform.python_version(),
                  git_commit=git_commit())
    records = []
    for work in cfg.works:
        backward = work == "train"
        log(f"[bench] {work}: the reference step, {cfg.warmup} warm-up + {cfg.iters} timed")
        ref = float(np.median(reference_times(work, cfg, base, device)))
        flops = sum(call_flops(c, backward) for c in calls)
        for name in cfg.dtypes:
            log(f"[bench] {work} {name}: {len(calls)} layers replayed, {cfg.warmup} warm-up + {cfg.iters} timed")
            replay = _Replay(calls, DTYPES[name], device, cfg.channels_last, backward, cfg.seed)
            run = graphed(replay.run, cfg.warmup) if device.type == "cuda" else replay.run
            times = np.asarray(time_fn(run, device, cfg.warmup, cfg.iters)["times_ms"])
            del replay
            floor = float(np.median(times))
            records.append(dict(work=work, dtype=name, **common, matrix_flops=flops, floor_ms=floor,
                                floor_p20_ms=float(np.percentile(times, 20)),
                                floor_p80_ms=float(np.percentile(times, 80)), times_ms=[float(v) for v in times],
                                matrix_tflops=flops / (floor * 1e-3) / 1e12, reference_ms=ref,
                                max_ratio=ref / floor,
                                timestamp=timestamp()))
    return records


# ----------------------------------------------------------------------------------------- output
_COLUMNS = ("work", "dtype", "matrix floor ms", "p20/p80 ms", "matrix TFLOP/s", "reference ms",
            "bound on speed-up")


def _row(r: dict) -> list[str]:
    return [r["work"], r["dtype"], f"{r['floor_ms']:.1f}", f"{r['floor_p20_ms']:.1f}/{r['floor_p80_ms']:.1f}",
            f"{r['matrix_tflops']:.3f}", f"{r['reference_ms']:.1f}", f"{r['max_ratio']:.2f}x"]


def _header(records: list[dict]) -> str:
    r = records[0]
    return (f"Matrix floor of the CBDM step ({r['layers']} Conv2d/Linear calls of a forward of 2x{r['batch_size']}), "
            f"{r['model_name']} UNet ({r['image_size']}x{r['image_size']}), {provenance(r)}; "
            f"{'channels_last' if r['channels_last'] else 'contiguous'}; median of {r['iters']} after "
            f"{r['warmup']} warm-up; reference: train = eager step, sample = reference sampler step")


def format_table(records: list) -> str:
    return text_table(_header(records), _COLUMNS, [_row(r) for r in records], left=2)


def format_markdown(records: list) -> str:
    return markdown_table(_header(records), _COLUMNS, [_row(r) for r in records])
