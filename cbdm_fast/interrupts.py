"""How the programs stop on SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop or preemption), and the exit
statuses that tell a script or a scheduler what happened (README, "Exit statuses"):

    0    done (train: also when it was stopped during its final sample grid, or had nothing left to train)
    1    an unexpected error (a bug: the traceback is printed)
    2    a bad flag, input, checkpoint or output path, named in a one-line message
    3    train: the loss became NaN or infinite; the last good checkpoint is kept
    75   train: stopped by a signal before its last step, after saving a checkpoint of the step it
         stopped at; --resume continues it exactly (sysexits' EX_TEMPFAIL: "try again later")
    130  stopped at once: a second signal during training, a signal before training started, or a signal
         during sampling or evaluation (finished sampling shards are kept); one line, no traceback

A training run handles its signals itself (cbdm_fast/training/stop.py); sampling and evaluation stop where
they are, as Python stops on Ctrl-C, and ``sigterm_interrupts`` makes SIGTERM do the same.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """A signal stopped the program at once; the CLIs print its message on one line and exit with
    EXIT_INTERRUPTED (a KeyboardInterrupt, so whatever handles Ctrl-C handles it too)."""


def reason(exc: KeyboardInterrupt) -> str:
    """' (SIGTERM received)' for an Interrupted that names its signal; '' for a plain Ctrl-C."""
    return f" ({exc})" if str(exc) else ""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"{signal.Signals(signum).name} received")


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block SIGTERM raises Interrupted where the program is, as Ctrl-C raises
    KeyboardInterrupt, so one ``except KeyboardInterrupt`` serves both. Outside the main thread (where
    Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
