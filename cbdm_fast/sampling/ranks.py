"""How the ranks of a torchrun sampling job agree (every function here is collective: every rank
calls it): a user error found by any rank before sampling stops every rank with one message, and
rank 0 alone opens the shard folder and tells the others what is left to sample.
In one process every collective returns at once, so there is one code path."""
from __future__ import annotations

import sys
from typing import Optional

from .. import dist
from .request import SampleError
from .shards import ShardMismatch, ShardRun


def report_error(msg: str, ctx=None) -> int:
    """Print ``error: msg`` (prefixed with the rank on ranks other than 0); the exit status 2."""
    tag = f"[rank {ctx.rank}] " if ctx is not None and ctx.enabled and not ctx.is_main else ""
    print(f"{tag}error: {msg}", file=sys.stderr, flush=True)
    return 2


def agree(error: Optional[str]) -> None:
    """SampleError on EVERY rank when any rank has an error, with the first failing rank's message
    (rank 0 prints it), so no rank goes on to wait for one that gave up. In one process:
    SampleError(error) when error is not None."""
    for rank, e in enumerate(dist.all_gather_object(error)):
        if e is not None:
            raise SampleError(e if rank == 0 else f"[rank {rank}] {e}")


def agreed(step, *args):
    """``step(*args)`` on every rank, then ``agree`` on its SampleError: returns its result on every
    rank, or raises SampleError on every rank when it failed on any."""
    result, error = None, None
    try:
        result = step(*args)
    except SampleError as exc:
        error = str(exc)
    agree(error)
    return result


def open_shards(run: ShardRun, ctx) -> list:
    """Rank 0 creates or checks the shard folder and its manifest, then tells every rank the pending
    shards (or its error). SampleError on every rank on a mismatch."""
    result = None
    if ctx.is_main:
        try:
            result = run.open()
        except ShardMismatch as exc:
            result = str(exc)
        except OSError as exc:
            result = f"cannot create the shard folder {run.folder}: {exc}"
    result = dist.broadcast_object(result)
    if isinstance(result, str):
        raise SampleError(result)
    # every rank writes its shards there, so it must see the folder rank 0 made (multi-node: shared storage)
    agree(None if run.has_manifest() else
          f"cannot see {run.manifest_path()}, which rank 0 wrote: --out must be on a filesystem that every "
          f"rank (every node) shares")
    return result
