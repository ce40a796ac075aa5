"""Evaluation sharded over torchrun ranks: each rank extracts the features of its slice, rank 0 scores.

    torchrun --standalone --nproc_per_node N -m cbdm_fast.evaluate --samples S.npz ...

What each rank does, and why:
- Process group: ``start`` creates one through ``dist.setup`` (gloo on the CPU, NCCL on
  cuda:LOCAL_RANK, on fresh keys of torchrun's store: the sampler of --ckpt has just used and left a
  group there); ``stop`` destroys it. Outside torchrun (or WORLD_SIZE 1) ``Shards`` is a single-process stand-in
  whose collectives return at once, so there is one code path.
- Objects (numpy feature slices, error messages, the recogniser's weights) travel over a gloo group
  (the default group when it is gloo, else one made here), so nothing large is staged in GPU memory.
- Slices: rank r takes images [n r / N, n (r + 1) / N), contiguous; ``gather`` collects every rank's
  result on rank 0 in rank order, so concatenating them gives the single-process order.
- Errors: ``checked(fn)`` runs a step on every rank and then agrees on its outcome (one small
  all_gather), so a bad input fails every rank with the same message and exit code instead of
  leaving the others waiting in the next collective. Rank 0 prints the message; the others stay quiet.
- Rank 0 waits for nothing but is waited for: it computes the metrics while the others sit in the
  final collective (the exit status), hence the long group timeout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..dist import RankPlace

GROUP_TIMEOUT_S = 6 * 3600.0   # rank 0 may score 50k samples alone (PRD, downstream) while the others wait


class ShardError(ValueError):
    """A step failed on some rank(s); the message names them (raised on every rank alike)."""


@dataclass
class Shards(RankPlace):
    """This process's place among the evaluation ranks (rank 0 of 1 outside torchrun)."""
    rank: int = 0
    world_size: int = 1
    group: Any = None   # the gloo group objects travel over (None: the default group)

    def part(self, n: int) -> slice:
        """This rank's contiguous slice of n items (sizes differ by at most one)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order, on rank 0; None on the other ranks."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_on_code(self, code: int) -> int:
        """The largest exit code of any rank, on every rank (so all ranks exit alike)."""
        return max(int(c) for c in self.all_gather(int(code)))

    def checked(self, fn: Callable[[], Any], catch=(ValueError, OSError)):
        """``fn()`` on every rank; if it raised ``catch`` on any rank, ShardError on every rank.

        In one process the exception passes through unchanged.
        """
        if not self.enabled:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except catch as exc:
            error = str(exc)
        errors = self.all_gather(error)
        if any(e is not None for e in errors):
            raise ShardError(describe_errors(errors))
        return result


def describe_errors(errors: list) -> str:
    """One message for the failed ranks: the message alone when every failed rank says the same."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if len({e for _, e in failed}) == 1 and len(failed) == len(errors):
        return failed[0][1]
    return "; ".join(f"rank {r}: {e}" for r, e in failed)


def concat_parts(parts: list, key: str):
    """Concatenate the (features, probs) pairs the ranks gathered under ``key``, in rank order
    (a rank with an empty slice holds None)."""
    pairs = [p[key] for p in parts if p[key] is not None]
    return tuple(np.concatenate([pair[i] for pair in pairs]) for i in range(2))


def start(device: torch.device) -> tuple[Shards, torch.device]:
    """Join a process group for the evaluation if torchrun started this process; (shards, this
    rank's device: cuda:LOCAL_RANK for a CUDA device). ``dist.setup`` makes the group (on fresh
    store keys: the sampler of --ckpt has just used and left one); a group the caller already
    initialised is used as it is and left up by ``stop``."""
    from .. import dist

    ctx = dist.from_env()
    if not ctx.enabled:
        return Shards(), device
    ctx, device = dist.setup(device, timeout_s=GROUP_TIMEOUT_S)
    return Shards(ctx.rank, ctx.world_size, dist.object_group()), device


def stop(shards: Shards) -> None:
    """Leave the process group ``start`` joined (``dist.cleanup``: destroyed if it made it)."""
    if shards.enabled:
        from .. import dist

        dist.cleanup()
