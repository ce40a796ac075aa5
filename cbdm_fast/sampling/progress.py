"""The progress bar of a sampling job (rank 0's own shards)."""
from __future__ import annotations

import sys
import time


class Progress:
    """tqdm over img-steps (this rank's own shards; disabled on other ranks), with a samples/s rate."""

    def __init__(self, images: int, steps: int, disable: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=images * steps, unit="img-step", file=sys.stderr, dynamic_ncols=True,
                        disable=disable, desc=desc)
        self.steps, self.done, self.shown = steps, 0.0, 0.0
        self.start = time.perf_counter()

    def batch(self, batch_size: int):
        """The per-step callback of one batch."""
        def progress(step):
            self.done += batch_size / self.steps
            self.bar.update(batch_size)
            now = time.perf_counter()
            if now - self.shown > 0.5:
                self.shown = now
                self.bar.set_postfix(samples_s=f"{self.done / max(now - self.start, 1e-9):.2f}", refresh=False)
        return progress

    def close(self) -> None:
        self.bar.close()
