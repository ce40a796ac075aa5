"""Per-op benchmark: every fused op against its torch composite and torch.compile of that composite.

Setups (one per op name; ``--size train`` shapes are the training / sampling shapes of the default
UNet, ``--size small`` tiny ones that run in seconds on a CPU):

    op                   torch provider                 fused provider                        train shape(s)
    group_norm_silu      F.group_norm -> F.silu         ops.group_norm_silu(backend="triton") 96x256x16x16,
    group_norm_silu_add  x + add[:, :, None, None],     the same with add=(N, C)              96x128x32x32
                         then F.group_norm -> F.silu
    group_norm           F.group_norm                   ops.group_norm_silu(act=False)
    q_sample             ops.q_sample_reference         ops.q_sample(backend="triton")        128x3x32x32
    cb_loss              ops.cb_loss_reference          ops.cb_loss(backend="triton")         h, h_bal: halves
                         (the ops of losses.cbdm_terms)                                       of 256x3x32x32
    attn_block           the authors' model.AttnBlock   nn.FusedAttnBlock.from_attn_block     96x256x16x16
    ddpm_step            ops.ddpm_step_reference        ops.ddpm_step(backend="extension")    64x3x32x32,
    ddim_step            ops.ddim_step_reference        ops.ddim_step(backend="extension")    256x3x32x32
    (the sampling steps guided, omega 1.5; DDIM with eta 0 and t_prev = t - 10)

The "compiled" provider is ``torch.compile`` of the torch provider (a copy of the module for
attn_block; torch._dynamo.reset() before each setup). The fused provider forces the fused backend:
where it cannot run (no GPU and no TRITON_INTERPRET=1, an extension that is not built, a dtype the
backend does not take) the row carries an ``error`` instead of silently timing the reference.
Every provider of a setup gets the same input tensors (the same module initialisation for
attn_block); default dtype bf16 on CUDA, fp32 on CPU (the extension's CPU path is fp32 only);
default layout channels_last (fp32 GroupNorm weight and bias; ddpm_step / ddim_step are always
contiguous: the extension rejects other layouts). Inputs of the ops that have a backward require grad:
x, weight, bias (and add) for the norms, x_0 and noise for q_sample, the 2B output for cb_loss, x and
every parameter for attn_block.

Modes: "fwd" (the training forward: autograd records the graph; the sampling steps, which have no
backward, run under no_grad), "bwd" (torch.autograd.grad of outputs from a forward done OUTSIDE the
timed region, retain_graph=True, with fixed random upstream gradients), "full" (forward + that
backward). ddpm_step / ddim_step only have "fwd".

Timing: ``warmup`` untimed calls, then ``reps`` timed calls. CUDA: one pair of CUDA events around
each call; before each call (outside the event pair) a 256 MiB buffer is zeroed so the inputs are not
served from L2 (as triton.testing.do_bench does). CPU: time.perf_counter around each call. Reported:
median, p20, p80 in ms.

``timing="graph"`` (CUDA only) measures GPU time alone: after the warm-up (on a side stream), GRAPH_CALLS
calls are captured in one CUDA graph and each timed repeat is one replay divided by GRAPH_CALLS. Per-call
("eager") timing includes the host's launch and autograd time, which dominates these microsecond
kernels on a slow host; graph timing is what the ops cost inside a CUDA-graphed training or sampling
step. No L2 flush between the calls of a replay (the training shapes' tensors exceed the L2 together).
A provider whose calls cannot be captured gets an ``error`` row.

Peak memory (CUDA only; None on CPU): ``peak_mem_bytes`` = torch.cuda.max_memory_allocated over the
timed calls, after reset_peak_memory_stats, less the L2-flush buffer (so it includes the setup's inputs
and, in bwd mode, the graph saved by the forward); ``peak_mem_delta_bytes`` = that peak less the memory
allocated when the timed calls start (the op's own outputs and temporaries).

Bandwidth: gb_per_s = counted minimum bytes / median time (1 GB = 1e9 bytes). The byte model (n =
elements of the main tensor, e = its element size; small terms of O(N*C) or O(B) included where listed):
  group norm (all three):  fwd   read x, write y                          2 n e + 2 C 4 (weight, bias fp32)
                                 (+ read add: N C e)
                           bwd   read x, dy, write dx                     3 n e + 4 C 4 (read w, b; write dw, db)
                                 (+ read add, write dadd: 2 N C e)
  q_sample:                fwd   read x_0, noise, write x_t               3 n e + 8 B (t)
                           bwd   read g, write dx_0, dnoise               3 n e + 8 B
  cb_loss (n = B*3*32*32): fwd   read h, h_bal, noise                     3 n e + 8 B
                           bwd   read h, h_bal, noise, write dh, dh_bal   5 n e + 8 B
  attn_block:              fwd   read x, the 4 CxC weights, write y       2 n e + 4 C^2 e
                           bwd   read x, dy, weights, write dx, dweights  3 n e + 8 C^2 e
                           (attention is compute-bound: its rows also give tflops, from
                            fwd FLOPs = 8 B L C^2 (4 1x1 convs) + 4 B L^2 C (QK^T, AV), bwd = 2 x fwd)
  ddpm_step:               fwd   read x_t, eps_c, eps_u, noise, write     5 n e + 8 B
  ddim_step (eta 0):       fwd   read x_t, eps_c, eps_u, write            4 n e + 16 B
  full = fwd + bwd for every op.
The device copy bandwidth (dst.copy_(src) of a 1 GiB buffer on CUDA, 32 MiB on CPU: 2 x size bytes
per copy) is measured once per run; pct_copy_bw = gb_per_s / copy_gb_per_s x 100.

Correctness: each provider runs one forward (and backward) before its timing; the record's
``max_rel_diff_vs_torch`` is max over outputs and gradients of max|a - ref| / max|ref| (see
max_rel_diff), against the torch provider's (so rows compare like with like).
"""
from __future__ import annotations

import copy
import datetime as _dt
import gc
import importlib.metadata
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .. import ops
from ..schedule import Schedule
from .train_bench import device_name, git_commit

OPS = ("group_norm_silu", "group_norm_silu_add", "group_norm", "q_sample", "cb_loss", "attn_block",
       "ddpm_step", "ddim_step")
PROVIDERS = ("torch", "fused", "compiled")
MODES = ("fwd", "bwd", "full")
SIZES = ("small", "train")
LAYOUTS = ("channels_last", "contiguous")
TIMINGS = ("eager", "graph")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

GROUPS = 32           # the UNet's GroupNorm groups
EPS = 1e-5
T = 1000
OMEGA = 1.5           # guidance strength of the sampling steps
DDIM_STRIDE = 10      # t_prev = t - 10: a DDIM-100 sub-sequence of T = 1000
TAU = 1.0

SHAPES = {
    "train": dict(norm=[(96, 256, 16, 16), (96, 128, 32, 32)], image_batch=128, image_size=32,
                  attn=(96, 256, 16, 16), step_batches=(64, 256)),
    # small: seconds on a CPU, also through the Triton interpreter; >= 2 channels per group, so no
    # gradient is exactly zero (with one channel per group, d add is 0 in exact arithmetic)
    "small": dict(norm=[(1, 64, 8, 8), (1, 128, 4, 4)], image_batch=4, image_size=8,
                  attn=(1, 64, 8, 8), step_batches=(4, 8)),
}
L2_FLUSH_BYTES = 256 * 2 ** 20


# ----------------------------------------------------------------------------------------- setups

@dataclass
class Runner:
    """One provider of one setup: ``fn()`` runs the forward; ``inputs`` are the tensors its backward
    differentiates (empty: no backward), named by ``names`` (shared names across providers)."""
    fn: Callable[[], Any]
    inputs: tuple = ()
    names: tuple = ()
    note: Optional[str] = None


@dataclass
class OpCase:
    """One benchmark setup: an op at one shape, dtype and layout, with its providers."""
    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    device: torch.device
    bytes: dict                         # mode -> counted minimum bytes (its keys are the op's modes)
    make: Callable[[str], Runner]       # provider -> Runner
    grad_outputs: Optional[tuple] = None
    flops: Optional[dict] = None        # mode -> FLOPs (attn_block only)
    note: Optional[str] = None

    @property
    def modes(self) -> tuple:
        return tuple(self.bytes)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, device, dtype, layout="contiguous", scale=1.0, offset=0.0, grad=False) -> Tensor:
    if device.type == "meta":  # shapes and byte counts only
        x = torch.empty(shape, device=device, dtype=dtype)
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)
    x = (torch.randn(shape, generator=g, dtype=torch.float32) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _full_bytes(b: dict) -> dict:
    if "bwd" in b:
        b["full"] = b["fwd"] + b["bwd"]
    return b


def _compile(fn):
    torch._dynamo.reset()  # every setup starts from empty caches (no recompile limit across setups)
    return torch.compile(fn)


def _gn_torch(x, w, b, add, G: int, eps: float, act: bool):
    u = x if add is None else x + add[:, :, None, None]
    z = F.group_norm(u, G, w, b, eps)
    return F.silu(z) if act else z


def _mixed_group_norm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether F.group_norm takes x's dtype with float32 weight and bias on this device."""
    if x.dtype == w.dtype:
        return True
    try:
        with torch.no_grad():
            F.group_norm(x[:1].detach(), GROUPS, w.detach(), w.detach(), EPS)
        return True
    except Exception:
        return False


def _norm_cases(op, size, dtype, layout, device, seed):
    act = op != "group_norm"
    with_add = op == "group_norm_silu_add"
    cases = []
    for k, shape in enumerate(SHAPES[size]["norm"]):
        g = _gen(seed + k)
        N, C = shape[:2]
        n, e = int(np.prod(shape)), torch.empty((), dtype=dtype).element_size()
        x = _randn(shape, g, device, dtype, layout, grad=True)
        w = _randn((C,), g, device, torch.float32, scale=0.2, offset=1.0, grad=True)
        b = _randn((C,), g, device, torch.float32, scale=0.2, grad=True)
        add = _randn((N, C), g, device, dtype, grad=True) if with_add else None
        dy = _randn(shape, g, device, dtype, layout)
        leaves = (x, w, b) + ((add,) if with_add else ())
        names = ("x", "weight", "bias") + (("add",) if with_add else ())
        nbytes = _full_bytes({"fwd": 2 * n * e + 2 * C * 4 + (N * C * e if with_add else 0),
                              "bwd": 3 * n * e + 4 * C * 4 + (2 * N * C * e if with_add else 0)})
        note = None
        if not _mixed_group_norm_ok(x, w):
            note = "torch/compiled: weight and bias cast to x's dtype (F.group_norm rejects mixed dtypes here)"

        def make(provider, x=x, w=w, b=b, add=add, leaves=leaves, names=names, note=note):
            if provider == "fused":
                fn = lambda: ops.group_norm_silu(x, w, b, GROUPS, EPS, add=add, act=act, backend="triton")
                return Runner(fn, leaves, names)
            if note is not None:  # leaves of x's dtype stand in for the fp32 weight and bias
                wt = w.detach().to(x.dtype).requires_grad_()
                bt = b.detach().to(x.dtype).requires_grad_()
                leaves = (x, wt, bt) + leaves[3:]
                w, b = wt, bt
            f = _gn_torch if provider == "torch" else _compile(_gn_torch)
            return Runner(lambda: f(x, w, b, add, GROUPS, EPS, act), leaves, names, note)

        cases.append(OpCase(op, shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,), note=note))
    return cases


def _image_shape(size, B=None):
    s = SHAPES[size]
    return (s["image_batch"] if B is None else B, 3, s["image_size"], s["image_size"])


def _q_sample_cases(size, dtype, layout, device, seed):
    shape = _image_shape(size)
    B, n = shape[0], int(np.prod(shape))
    e = torch.empty((), dtype=dtype).element_size()
    g = _gen(seed)
    sched = Schedule(T, device=device)
    x0 = _randn(shape, g, device, dtype, layout, grad=True)
    noise = _randn(shape, g, device, dtype, layout, grad=True)
    t = torch.randint(0, T, (B,), generator=g).to(device)
    dy = _randn(shape, g, device, dtype, layout)
    sa, s1a = sched.sqrt_alphas_bar, sched.sqrt_one_minus_alphas_bar
    nbytes = _full_bytes({"fwd": 3 * n * e + 8 * B, "bwd": 3 * n * e + 8 * B})

    def make(provider):
        if provider == "fused":
            fn = lambda: ops.q_sample(x0, t, noise, sa, s1a, backend="triton")
        else:
            f = ops.q_sample_reference if provider == "torch" else _compile(ops.q_sample_reference)
            fn = lambda: f(x0, t, noise, sa, s1a)
        return Runner(fn, (x0, noise), ("x_0", "noise"))

    return [OpCase("q_sample", shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,))]


def _cb_loss_cases(size, dtype, layout, device, seed):
    shape = _image_shape(size)
    B, n = shape[0], int(np.prod(shape))
    e = torch.empty((), dtype=dtype).element_size()
    g = _gen(seed)
    out = _randn((2 * B,) + shape[1:], g, device, dtype, layout, grad=True)  # the network's 2B output
    noise = _randn(shape, g, device, dtype, layout)
    t = torch.randint(0, T, (B,), generator=g).to(device)
    keep = torch.ones((), device=device)  # the fused training step's 0-dim keep
    g1 = torch.ones((), device=device)
    nbytes = _full_bytes({"fwd": 3 * n * e + 8 * B, "bwd": 5 * n * e + 8 * B})

    def make(provider):
        if provider == "fused":
            fn = lambda: ops.cb_loss(out[:B], out[B:], noise, t, T, TAU, keep=keep, backend="triton")
        else:
            f = ops.cb_loss_reference if provider == "torch" else _compile(ops.cb_loss_reference)
            fn = lambda: f(out[:B], out[B:], noise, t, T, TAU, keep)
        return Runner(fn, (out,), ("out",))

    return [OpCase("cb_loss", shape, dtype, layout, device, nbytes, make, grad_outputs=(g1, g1.clone()),
                   note="h = out[:B], h_bal = out[B:] of one 2B output; tau 1, keep = 1")]


def _attn_cases(size, dtype, layout, device, seed):
    from ..model import AttnBlock
    from ..nn.attention import FusedAttnBlock
    shape = SHAPES[size]["attn"]
    B, C, H, W = shape
    L, n = H * W, int(np.prod(shape))
    e = torch.empty((), dtype=dtype).element_size()
    g = _gen(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = AttnBlock(C)
        torch.nn.init.xavier_uniform_(block.proj.weight)  # as the enclosing ResBlock re-initialises it
        for m in (block.proj_q, block.proj_k, block.proj_v, block.proj):
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
        torch.nn.init.uniform_(block.group_norm.weight, 0.8, 1.2)
        torch.nn.init.uniform_(block.group_norm.bias, -0.1, 0.1)
    block = block.to(device=device, dtype=dtype)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
    x = _randn(shape, g, device, dtype, layout, grad=True)
    dy = _randn(shape, g, device, dtype, layout)
    nbytes = _full_bytes({"fwd": 2 * n * e + 4 * C * C * e, "bwd": 3 * n * e + 8 * C * C * e})
    fwd_flops = 8 * B * L * C * C + 4 * B * L * L * C
    flops = {"fwd": fwd_flops, "bwd": 2 * fwd_flops, "full": 3 * fwd_flops}

    def make(provider):
        if provider == "torch":
            m = block
        elif provider == "fused":
            m = FusedAttnBlock.from_attn_block(copy.deepcopy(block), backend="triton")
        else:
            m = copy.deepcopy(block)
        params = sorted(m.named_parameters())
        names = ("x",) + tuple(k for k, _ in params)
        leaves = (x,) + tuple(p for _, p in params)
        f = _compile(m) if provider == "compiled" else m
        return Runner(lambda: f(x), leaves, names)

    return [OpCase("attn_block", shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,), flops=flops)]


def _step_cases(op, size, dtype, device, seed):
    cases = []
    sched = Schedule(T, device=device)
    for k, B in enumerate(SHAPES[size]["step_batches"]):
        shape = _image_shape(size, B)
        n, e = int(np.prod(shape)), torch.empty((), dtype=dtype).element_size()
        g = _gen(seed + k)
        x_t, eps_c, eps_u, noise = (_randn(shape, g, device, dtype) for _ in range(4))
        if op == "ddpm_step":
            t = torch.randint(0, T, (B,), generator=g).to(device)
            table = sched.sampling_table("fixedlarge").to(device)
            args = (x_t, eps_c, eps_u, t, noise, table, OMEGA)
            ref, fused = ops.ddpm_step_reference, ops.ddpm_step
            nbytes = {"fwd": 5 * n * e + 8 * B}
            note = f"guided, omega {OMEGA}"
        else:
            t = torch.randint(1, T, (B,), generator=g).to(device)
            t_prev = (t - DDIM_STRIDE).clamp(min=-1)
            ab = sched.alphas_bar.float().contiguous()
            args = (x_t, eps_c, eps_u, t, t_prev, None, ab, 0.0, OMEGA)
            ref, fused = ops.ddim_step_reference, ops.ddim_step
            nbytes = {"fwd": 4 * n * e + 16 * B}
            note = f"guided, omega {OMEGA}, eta 0, t_prev = t - {DDIM_STRIDE}"

        def make(provider, args=args, ref=ref, fused=fused):
            if provider == "fused":
                return Runner(lambda: fused(*args, backend="extension"))
            f = ref if provider == "torch" else _compile(ref)
            return Runner(lambda: f(*args))

        cases.append(OpCase(op, shape, dtype, "contiguous", device, nbytes, make, note=note))
    return cases


def build_cases(op: str, size: str = "small", dtype: torch.dtype = torch.float32, layout: str = "channels_last",
                device="cpu", seed: int = 0) -> list[OpCase]:
    """The setups of ``op`` (one per shape) at ``size``; see the module docstring."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    device = torch.device(device)
    if op.startswith("group_norm"):
        return _norm_cases(op, size, dtype, layout, device, seed)
    if op == "q_sample":
        return _q_sample_cases(size, dtype, layout, device, seed)
    if op == "cb_loss":
        return _cb_loss_cases(size, dtype, layout, device, seed)
    if op == "attn_block":
        return _attn_cases(size, dtype, layout, device, seed)
    return _step_cases(op, size, dtype, device, seed)


# ----------------------------------------------------------------------------------------- running

def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def forward(case: OpCase, runner: Runner) -> tuple:
    """One forward of ``runner`` (under no_grad when the op has no backward), as a tuple of outputs."""
    if runner.inputs:
        return _as_tuple(runner.fn())
    with torch.no_grad():
        return _as_tuple(runner.fn())


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
        return lambda: torch.autograd.grad(outs, runner.inputs, case.grad_outputs, retain_graph=True)
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


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int,
            flush: Optional[Tensor] = None) -> dict:
    """``warmup`` untimed calls then ``reps`` timed calls: times_ms, peak memory (CUDA; None on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for a, b in events:
            if flush is not None:
                flush.zero_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in events]
        peak = torch.cuda.max_memory_allocated(device)
        flush_bytes = flush.numel() * flush.element_size() if flush is not None else 0
        return dict(times_ms=times, peak_mem_bytes=int(peak - flush_bytes), peak_mem_delta_bytes=int(peak - base))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(times_ms=times, peak_mem_bytes=None, peak_mem_delta_bytes=None)


GRAPH_CALLS = 20  # calls per CUDA-graph replay in timing="graph"


def time_fn_graph(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict:
    """GPU time per call from CUDA-graph replays of GRAPH_CALLS calls (see the module docstring)."""
    if device.type != "cuda":
        raise ValueError("graph timing needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
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
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del graph
    return dict(times_ms=[a.elapsed_time(b) / GRAPH_CALLS for a, b in events], peak_mem_bytes=int(peak),
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
        nbytes = 2 ** 30 if device.type == "cuda" else 32 * 2 ** 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    res = time_fn(lambda: dst.copy_(src), device, warmup, reps)
    med = float(np.median(res["times_ms"]))
    del src, dst
    return 2 * nbytes / (med * 1e-3) / 1e9


def triton_version() -> Optional[str]:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


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
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda and cfg.flush_l2 else None
    common = dict(device=device.type, device_name=device_name(device), torch_version=torch.__version__,
                  triton_version=triton_version(), git_commit=git_commit(), size=cfg.size,
                  warmup=cfg.warmup, reps=cfg.reps, copy_gb_per_s=copy_gbps, l2_flush=flush is not None and cfg.timing == "eager",
                  timing=cfg.timing,
                  extension=ops.extension_available(),
                  num_threads=torch.get_num_threads() if not cuda else None)
    records = []
    for op in cfg.ops:
        try:
            cases = build_cases(op, cfg.size, dtype, cfg.layout, device, cfg.seed)
        except Exception as e:  # a setup that cannot even be built: one error record per provider
            for p in cfg.providers:
                records.append(dict(op=op, shape=None, dtype=cfg.dtype, layout=cfg.layout, provider=p, mode=None,
                                    **_empty_metrics(), **common, note=None, error=_err(e),
                                    timestamp=_now()))
            continue
        for case in cases:
            records += _run_case(case, cfg, common, flush, copy_gbps, log)
            del case
            _free(device)
    _speedups(records)
    return records


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _empty_metrics() -> dict:
    return dict(median_ms=None, p20_ms=None, p80_ms=None, gb_per_s=None, pct_copy_bw=None, tflops=None,
                peak_mem_bytes=None, peak_mem_delta_bytes=None, speedup_vs_torch=None, bytes=None,
                max_rel_diff_vs_torch=None, times_ms=None)


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
            error = _err(e)
        for mode in modes:
            rec = dict(base, mode=mode, **_empty_metrics(), **common)
            rec["note"] = "; ".join(s for s in (case.note, runner.note if runner else None) if s) or None
            if error is not None:
                rec["error"] = error
            else:
                try:
                    log(f"[ops] {case.op} {case.shape_str} {provider} {mode}")
                    fn = mode_fn(case, runner, mode)
                    res = (time_fn_graph(fn, device, cfg.warmup, cfg.reps) if cfg.timing == "graph"
                           else time_fn(fn, device, cfg.warmup, cfg.reps, flush))
                    times = np.asarray(res["times_ms"])
                    med = float(np.median(times))
                    nbytes = case.bytes[mode]
                    gbps = nbytes / (med * 1e-3) / 1e9
                    rec.update(median_ms=med, p20_ms=float(np.percentile(times, 20)),
                               p80_ms=float(np.percentile(times, 80)), times_ms=[float(v) for v in times],
                               bytes=nbytes, gb_per_s=gbps, pct_copy_bw=100.0 * gbps / copy_gbps,
                               tflops=(case.flops[mode] / (med * 1e-3) / 1e12) if case.flops else None,
                               peak_mem_bytes=res["peak_mem_bytes"],
                               peak_mem_delta_bytes=res["peak_mem_delta_bytes"], max_rel_diff_vs_torch=diff)
                except Exception as e:
                    rec["error"] = _err(e)
                _free(device)
            rec["timestamp"] = _now()
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
