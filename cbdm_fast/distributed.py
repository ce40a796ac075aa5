"""Data-parallel training under torchrun: the same algorithm as one process, the global batch split.

    torchrun --standalone --nproc_per_node N -m cbdm_fast.train --batch-size 48 ...

``--batch-size`` is the GLOBAL batch; each of the N ranks trains on batch_size / N images of it
(an error names both numbers when N does not divide it). What each rank does, and why:

- Process group: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. ``setup`` initialises NCCL with the
  device cuda:LOCAL_RANK on a GPU, gloo on the CPU, plus a small gloo group for host-side flags
  (the stop request), so checking it never waits on the GPU. WORLD_SIZE 1 (or no torchrun) is the
  plain single-process path, untouched.
- Data: every rank draws the same epoch permutation (and flips) from the shared seed and takes its
  own contiguous slice of each global batch (``BatchStream(rank=, world_size=)``): the union over
  ranks is the single-process batch, and resume is exact.
- Random draws: t, noise, the label drop and y_bal are drawn for the WHOLE global batch on every
  rank, from a "draw" generator that starts in the state the single process's default generator
  has after model initialisation, and each rank keeps its slice. So the label drop is one draw per
  global batch on which all ranks agree (as in the authors' algorithm), and a run on N ranks draws
  exactly the randomness of the single process (tests/test_distributed.py compares them). The
  default generators, which now drive only dropout, are re-seeded per rank (``rank_seed``) so
  dropout masks are independent across ranks. With dropout > 0 the N-rank run is the same
  algorithm with different dropout masks; with dropout 0 it matches the single process up to fp32
  reduction order.
- Gradients: each rank's loss is the mean over its slice; DDP averages the gradients, which is the
  gradient of the global-batch mean (equal slices). Clipping, Adam and EMA then see identical
  gradients on every rank, so parameters and EMA stay identical without further communication.
  The logged losses are all-reduced means (one 3-element collective per step, on the device).
- The label embedding on a whole-batch label drop: the fused/compiled step keeps it in the graph
  (its output times keep = 0, an exact-zero gradient; ``steps._AdamSkip`` undoes Adam's move), so
  DDP runs with find_unused_parameters=False. The eager step (the authors' two forwards) does not
  use it at all then, so its DDP uses find_unused_parameters=True (DDP marks the unused parameter
  ready instead of waiting for it forever), and the step sets its gradient to None afterwards so
  Adam skips it, exactly as the single process does. Both forwards run inside one DDP forward
  (``EagerPair``) because DDP expects one forward per backward.
- Compiled backend: torch.compile of the DDP module; the one-CUDA-graph-per-step capture is off
  under DDP (whole-step capture of NCCL collectives is not supported here yet).
- Checkpoints: written by rank 0 only, atomically, followed by a barrier. They hold the draw
  generators' states under rng["cpu"]/rng["cuda"] (the same keys as a single-process checkpoint,
  whose default generator plays that role) and every rank's own (dropout) generator states,
  gathered with all_gather_object, under rng["ranks"]. Resuming on the same number of ranks is
  exact; on another number of ranks (or in one process) the data and the draws continue exactly
  and only the dropout streams are re-derived from (seed, rank, step).
- Stopping: a SIGTERM/SIGINT on any rank sets a flag that is all-reduced (max) after every step
  over the gloo group, so every rank stops after the same step and rank 0 saves. A repeated signal
  within a few seconds (torchrun forwards the signal it received to workers that may already have
  it) does not abort the save.
- Logging, the progress bar, TensorBoard, config.json and sample grids: rank 0 only.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .compiled_step import FastStep, _NoScheduler
from .steps import Draws, draw_device, fused_step

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankPlace:
    """``enabled`` (more than one process) and ``is_main`` (rank 0) for anything with rank and world_size."""
    rank: int
    world_size: int

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Context(RankPlace):
    """Where this process stands: rank, world_size, local_rank; ``enabled`` when world_size > 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


_ctx = Context()
_cpu_group = None   # gloo group for host-side flags and objects (the default group when it is gloo)
_owns_group = False  # setup() initialised the default group (so cleanup() destroys it)
_GROUP_KEYS = itertools.count()  # the store key prefix of each group setup() creates


def _env_int(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set (torchrun sets {', '.join(ENV_VARS)})")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env() -> Context:
    """The Context torchrun's environment describes (world size 1 when not under torchrun)."""
    if "WORLD_SIZE" not in os.environ:
        return Context()
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Context(rank, world, local)


def context() -> Context:
    return _ctx


def is_main() -> bool:
    return _ctx.is_main


def is_enabled() -> bool:
    return _ctx.enabled and dist.is_available() and dist.is_initialized()


def check_batch_size(batch_size: int, world_size: int) -> None:
    """ValueError naming both numbers when the global batch cannot be split evenly over the ranks."""
    if world_size > 1 and batch_size % world_size:
        lo = max(world_size, batch_size // world_size * world_size)
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by WORLD_SIZE "
                         f"{world_size} (the number of torchrun processes): use a multiple of {world_size}, "
                         f"e.g. {lo} or {lo + world_size}")


def local_device(device: torch.device, ctx: Context) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (one GPU per process); a CPU stays the CPU."""
    if device.type != "cuda" or not ctx.enabled:
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                         f"are visible: use --nproc_per_node <= the GPU count")
    return torch.device("cuda", ctx.local_rank)


def setup(device: torch.device, batch_size: Optional[int] = None,
          timeout_s: float = 1800.0) -> tuple[Context, torch.device]:
    """Initialise the process group when torchrun started this process with WORLD_SIZE > 1.

    Returns (context, this rank's device). Idempotent. Checks the global batch size BEFORE joining
    the group, so a bad --batch-size fails at once on every rank instead of hanging. A group that the
    caller already initialised is used as it is (and left up by ``cleanup``).
    """
    global _ctx, _cpu_group, _owns_group
    ctx = from_env()
    if not ctx.enabled:
        return ctx, device
    if batch_size is not None:
        check_batch_size(batch_size, ctx.world_size)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = local_device(device, ctx)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        if _owns_group:
            return _ctx, device
        return _adopt_group(ctx, device, timeout), device
    store = _fresh_store(ctx, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout,
                                device_id=device)
        _cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
        _cpu_group = None  # the default group is gloo already
    _ctx, _owns_group = ctx, True
    return ctx, device


def _fresh_store(ctx: Context, timeout: datetime.timedelta):
    """torchrun's rendezvous store under a key prefix of its own, one per group this process creates.

    ``evaluate --ckpt`` runs the sampler (one group, then destroyed) and then the evaluation (a second
    group) in one process. Ranks leave a group at different times, and a second group on the same keys
    can read a slower rank's stale address keys and connect to its old group (a hang or 'connection
    reset'). Every rank creates its groups in the same order, so the counters agree.
    """
    base, _, _ = next(dist.rendezvous("env://", rank=ctx.rank, world_size=ctx.world_size, timeout=timeout))
    return dist.PrefixStore(f"cbdm_fast/{next(_GROUP_KEYS)}/", base)


def object_group():
    """The gloo group for host-side flags and objects (None: the default group, which is gloo)."""
    return _cpu_group


def _adopt_group(ctx: Context, device: torch.device, timeout: datetime.timedelta) -> Context:
    """Use a process group the caller initialised (e.g. ``sample.main`` called in-process by a launcher
    that already joined one): its rank and size must be torchrun's; ``cleanup`` will leave it alone."""
    global _ctx, _cpu_group, _owns_group
    if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
        raise ValueError(f"the process group already initialised has rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, but the environment says RANK={ctx.rank} "
                         f"WORLD_SIZE={ctx.world_size}")
    if _ctx != ctx:
        # host-side flags need a CPU-capable group; the caller's may be NCCL only
        _cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        _ctx, _owns_group = ctx, False
    return ctx


def cleanup() -> None:
    """Leave the process group that ``setup`` created (a no-op when none was; a group the caller
    initialised stays up, only the gloo side group made for it is destroyed)."""
    global _ctx, _cpu_group, _owns_group
    if not _owns_group:
        if _cpu_group is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group(_cpu_group)
        _ctx, _cpu_group = Context(), None
        return
    if dist.is_available() and dist.is_initialized():
        # Collect reference cycles (e.g. exception tracebacks holding collective results) before and after
        # the teardown, so no gloo work object outlives the group into interpreter finalization: there its
        # destruction aborted the process ("terminate called without an active exception", ~1 exit in 10
        # of a 2-rank sampling run; 0 in 70 with these collects).
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _ctx, _cpu_group, _owns_group = Context(), None, False


def barrier() -> None:
    """Host-side barrier over the gloo group (does not wait for queued GPU work)."""
    if is_enabled():
        dist.barrier(group=_cpu_group)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (SUM then divide: gloo has no AVG). Returns the tensor."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(_ctx.world_size)
    return tensor


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (a host-side collective over gloo)."""
    if not is_enabled():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(t.item())


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not is_enabled():
        return [obj]
    out = [None] * _ctx.world_size
    dist.all_gather_object(out, obj, group=_cpu_group)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process); a host-side collective."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A per-rank seed for the rank's own streams (dropout), distinct across ranks and resumes."""
    import numpy as np
    return int(np.random.SeedSequence([int(seed), int(rank), int(step), 0xCBD]).generate_state(1, np.uint64)[0]
               % (2 ** 63))


def clone_generator(state: torch.Tensor, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.set_state(state)
    return g


# ------------------------------------------------------------------------------ DDP models
class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that exposes the wrapped UNet's label embedding, which
    ``steps.fused_step`` looks up (getattr) for the whole-batch label-drop Adam skip."""

    @property
    def label_embedding(self):
        return getattr(self.module, "label_embedding", None)


class EagerPair(torch.nn.Module):
    """The eager step's two forwards (h on y, h_bal on y_bal) as ONE module call, for DDP.

    h_bal is None when y_bal is None (no regulariser, or the whole batch dropped its labels).
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, y=None, y_bal=None, y_mask=None, augm=None):
        h = self.unet(x_t, t, y=y, y_mask=y_mask, augm=augm)
        h_bal = self.unet(x_t, t, y=y_bal, y_mask=y_mask, augm=augm) if y_bal is not None else None
        return h, h_bal


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool, stream=None) -> DDP:
    """``module`` in DistributedDataParallel. ``stream``: a CUDA stream to build it on, for a step that
    will be captured as a CUDA graph on that stream (DDP keeps the parameters' gradient accumulators,
    which remember the stream they were made on; see DistributedFastStep)."""
    ids = [device.index] if device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            ddp = wrap(module, device, find_unused_parameters)
        torch.cuda.current_stream(device).wait_stream(stream)
        return ddp
    # buffer syncing is left at its default: the UNet has no buffers (its sinusoidal table is a frozen
    # parameter), so there is nothing to broadcast (and torch 2.13 deprecates broadcast_buffers)
    return DDP(module, device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=find_unused_parameters)


# ------------------------------------------------------------------------------ draws
def rank_slice(ctx: Context, local_batch: int) -> slice:
    return slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)


def slice_draws(d: Draws, part: slice) -> Draws:
    """This rank's part of the global batch's draws (a 0-dim keep is shared by every sample)."""
    keep = d.keep if d.keep.ndim == 0 else d.keep[part]
    return Draws(d.t[part], d.noise[part], keep, None if d.y_bal is None else d.y_bal[part])


def draw_global(x_0: torch.Tensor, ctx: Context, class_cdf, T: int, drop_p: float, cb: bool,
                generator: torch.Generator, per_sample: bool = False) -> Draws:
    """``steps.draw_device`` for the whole global batch (the single process's exact call), sliced."""
    b = x_0.shape[0]
    B = b * ctx.world_size
    like = x_0[:1].expand(B, *x_0.shape[1:])  # the global batch's shape, device and dtype; no memory
    d = draw_device(B, like, class_cdf, T, drop_p, cb, generator=generator, per_sample=per_sample)
    return slice_draws(d, rank_slice(ctx, b))


DDP_GRAPH_WARMUP = 11  # DDP-enabled eager steps before a capture (PyTorch's CUDA-graph notes for DDP)


class DistributedFastStep(FastStep):
    """FastStep under DDP: global draws from a shared generator, the DDP module's forward, and the
    logged losses (and the finite-loss bookkeeping) on their all-reduced means, so every rank sees
    the same values and stops at the same step.

    No CUDA graph by default (the Trainer's setting; see the module docstring). ``cuda_graph=True``
    (experimental, used by ``bench train --ddp-cuda-graph``; not yet run on a GPU) captures the whole
    step, DDP's gradient all-reduce included, following PyTorch's recipe for DDP: the DDP module built on
    ``side_stream`` (``wrap(..., stream=side_stream)``), at least DDP_GRAPH_WARMUP eager steps on that
    stream, and the capture on it too; NCCL >= 2.9.6 captures collectives. The draw generator is
    registered with the graph, so every replay draws fresh t, noise, label drop and y_bal."""

    def __init__(self, model, ddp_model, generator: torch.Generator, ctx: Context, *args, cuda_graph: bool = False,
                 side_stream=None, **kwargs):
        if cuda_graph:
            if side_stream is None:
                raise ValueError("cuda_graph=True under DDP needs side_stream: the stream the DDP module was "
                                 "built on (distributed.wrap(..., stream=side_stream))")
            kwargs["warmup"] = max(int(kwargs.get("warmup", 3)), DDP_GRAPH_WARMUP)
        super().__init__(model, *args, cuda_graph=cuda_graph, side_stream=side_stream, **kwargs)
        self.generator, self.ctx = generator, ctx
        self.forward_model = (torch.compile(ddp_model, dynamic=False, **(kwargs.get("compile_options") or {}))
                              if self.backend == "compiled" else ddp_model)

    def _graph_generators(self) -> list:
        return [self.generator] if self.generator.device.type == "cuda" else []

    def _body(self, x_0, y, augm=None):
        d = draw_global(x_0, self.ctx, self.class_cdf, self.schedule.T, self.drop_p, self.cb,
                        self.generator, per_sample=self.per_sample)
        out = fused_step(self.forward_model, self.ema, self.optimizer, _NoScheduler, self.schedule, x_0, y, d,
                         self.cfg, ema_tensors=self.pairs, augm=augm)
        terms = all_reduce_mean(torch.stack([out["loss"], out["loss_ddpm"], out["loss_reg"]]))
        out = {"loss": terms[0], "loss_ddpm": terms[1], "loss_reg": terms[2]}
        self._count.add_(1)
        bad = ~torch.isfinite(out["loss"]) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self._count, self.first_bad))
        return out

