"""The process-group runtime, and nothing above it: where this process stands (rank, world size, its
device), setting the group up and tearing it down, and the few collectives the programs use.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. ``setup`` initialises NCCL with the device
cuda:LOCAL_RANK on a GPU, gloo on the CPU, plus a small gloo group for host-side flags and objects
(a stop request, shard assignments), so checking them never waits on the GPU. WORLD_SIZE 1 (or no
torchrun) is the plain single-process path: every collective here is then a no-op that returns its
input. What a data-parallel training step does with this runtime is in cbdm_fast/training/ddp.py.
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


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The device a ``--device`` value names: auto (CUDA when available, else the CPU), cpu, cuda or
    cuda:N. ValueError naming the value for anything else, or for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
