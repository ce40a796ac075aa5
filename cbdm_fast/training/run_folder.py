"""A run folder (--logdir) belongs to one run: its config.json says which run, and its ckpt_<step>.pt files
are that run's. A new run into a folder that holds another run is refused before anything is written,
naming --resume (continue that run) and --start-over (move it aside first), so no run's checkpoints are
overwritten or rotated away by another, config.json always describes the checkpoints beside it, and the
last "checkpoint ..." line of a run names a file that is there.

--start-over moves everything in a folder that holds a run, except earlier moved runs, into
<logdir>/replaced-<time>/ (on the same file system: renames, nothing copied or deleted); TensorBoard,
pointed at the logdir, shows the moved run's curves under that name. A folder that holds no run (no
checkpoint, no config.json) is left as it is: its files are not a run's to move.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..files import checkpoint as ckpt_io

CONFIG_NAME = "config.json"
REPLACED_PREFIX = "replaced-"


class RunFolderError(ValueError):
    """A new run would write into a folder that holds another run."""


def saved_config(logdir) -> Optional[dict]:
    """The config.json of ``logdir`` (None when there is none, or it cannot be read)."""
    try:
        return json.loads((Path(logdir) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def held_run(logdir) -> list[str]:
    """The names of what makes ``logdir`` hold a run: its checkpoints, then its config.json."""
    logdir = Path(logdir)
    names = [p.name for p in ckpt_io.find_checkpoints(logdir)]
    if (logdir / CONFIG_NAME).is_file():
        names.append(CONFIG_NAME)
    return names


def check_new_run(logdir, same_config: Callable[[dict], bool], resumed_from: Optional[Path] = None) -> None:
    """Refuse (RunFolderError) a new run into ``logdir`` when the folder holds a run: any checkpoint, or a
    config.json for which ``same_config`` is False. A config.json of the same configuration and no
    checkpoint is the same run started again before its first checkpoint (a requeued job), which may
    go on. ``resumed_from``: the checkpoint a resumed run continues, when it writes into a folder other
    than the one that holds it."""
    held = held_run(logdir)
    config = saved_config(logdir)
    if not held or (held == [CONFIG_NAME] and config is not None and same_config(config)):
        return
    shown = ", ".join(held if len(held) <= 4 else held[:2] + ["..."] + held[-2:])
    if resumed_from is not None:
        raise RunFolderError(f"--logdir {logdir} holds another run ({shown}); --resume {resumed_from} would write "
                             f"its checkpoints beside them: choose another --logdir, or leave it out to continue "
                             f"in the run's own folder")
    raise RunFolderError(f"--logdir {logdir} already holds a run ({shown}): continue it with --resume, or start a new "
                         f"run there with --start-over (moves the old one into {Path(logdir) / REPLACED_PREFIX}"
                         f"<time>/), or choose another --logdir")


def start_over(logdir, say: Callable[..., None]) -> Optional[Path]:
    """--start-over: move the run in ``logdir`` (everything but earlier moved runs) into
    <logdir>/replaced-<time>/; returns that folder, or None when the folder holds no run (then nothing is
    moved: a folder of other files given as --logdir by mistake stays as it is)."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return None
    if not held_run(logdir):
        say(f"--start-over: {logdir} holds no run (no checkpoint, no {CONFIG_NAME}); nothing was moved", flush=True)
        return None
    entries = [p for p in logdir.iterdir() if not (p.is_dir() and p.name.startswith(REPLACED_PREFIX))]
    if not entries:
        return None
    name = f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = logdir / name, 2
    while target.exists():  # two starts over within a second
        target, n = logdir / f"{name}-{n}", n + 1
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    say(f"--start-over: moved the previous run in {logdir} ({len(entries)} entries) to {target}", flush=True)
    return target
