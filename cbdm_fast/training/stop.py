"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop or preemption).

The first signal asks the run to stop after the current step: the loop then saves a checkpoint and the
CLI exits with EXIT_STOPPED (cbdm_fast/interrupts.py), so ``train && sample`` does not go on with an
unfinished model. Work that is not training (an evaluation, a sample grid, the final grid) runs through
``abandon``: a signal during it abandons it at once, so a stop never waits minutes for sampling. A
second signal stops at once (Interrupted: one line, exit status 130).

Data parallel: ``requested`` is a collective, so a signal on any rank stops every rank after the same
step. torchrun forwards the signals it gets to every worker, which may have had them already: a second
signal within FORWARD_GRACE_S of the first is taken as that echo.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Callable, Optional

from .. import dist
from ..interrupts import Interrupted

FORWARD_GRACE_S = 5.0


class Abandon(BaseException):
    """Raised by the signal handler inside ``StopSignals.abandon``'s work (a BaseException, so that no
    ``except Exception`` of the evaluation or the sampler swallows it)."""


class StopSignals:
    """The run's SIGINT/SIGTERM handler (``installed``), and what the loop asks of it."""

    def __init__(self, ctx, log: Callable[[str], None]):
        self.ctx, self.log = ctx, log
        self.signum: Optional[int] = None  # the first signal received
        self._time = 0.0
        self._abandoning: Optional[tuple] = None  # (what a signal abandons now, what follows)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:  # a second signal: stop at once
            if self.ctx.enabled and now - self._time < FORWARD_GRACE_S:
                return
            raise Interrupted(f"{signal.Signals(signum).name} received again: stopped at once")
        self.signum, self._time = signum, now
        if self._abandoning:
            what, after = self._abandoning
            msg = f"{self.name} received: abandoning {what}; {after} (a second one stops at once)"
        else:
            msg = f"{self.name} received: saving a checkpoint after this step... (a second one stops at once)"
        if self.ctx.is_main:
            self.log("\n" + msg)
        else:
            print(f"[rank {self.ctx.rank}] {msg}", file=sys.stderr, flush=True)
        if self._abandoning:
            raise Abandon

    def requested(self) -> bool:
        """Whether the run should stop now: a signal on any rank (a collective under data parallelism)."""
        stop = self.signum is not None
        if self.ctx.enabled:
            stop = dist.any_true(stop)
            if stop and self.signum is None:
                self.log("\nanother rank received a signal: saving a checkpoint after this step...")
        return stop

    def abandon(self, what: str, work: Callable, *args, after: str = "saving a checkpoint..."):
        """``work(*args)``, or None when a signal came before it (it is skipped) or while it runs (it is
        abandoned at once; ``work`` must leave the training state as it was when interrupted anywhere).
        ``after``: what the run does next, for the message."""
        if self.signum is not None:
            return None
        result = None
        try:
            try:
                self._abandoning = (what, after)
                result = work(*args)
            finally:
                self._abandoning = None
        except Abandon:  # also when the signal came as the work returned
            return None
        return result
