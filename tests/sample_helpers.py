"""What the sampling tests share: the shards a run writes, and a run killed (Ctrl-C) after some of them."""
from __future__ import annotations

import contextlib
from typing import Optional

from cbdm_fast.sampling.shards import ShardRun


@contextlib.contextmanager
def shard_writes(interrupt_after: Optional[int] = None):
    """Inside the block ShardRun.write records the index of every shard it writes (the yielded list) and,
    with ``interrupt_after`` = k, raises KeyboardInterrupt right after the k-th, as a Ctrl-C then would."""
    real_write, written = ShardRun.write, []

    def write(run, i, images, labels):
        real_write(run, i, images, labels)
        written.append(i)
        if len(written) == interrupt_after:
            raise KeyboardInterrupt

    ShardRun.write = write
    try:
        yield written
    finally:
        ShardRun.write = real_write
