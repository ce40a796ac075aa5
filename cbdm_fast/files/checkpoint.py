"""Checkpoints: atomic, checksummed writes; loading ours or the CBDM authors' ckpt_*.pt files; the
checkpoints of a run folder (the newest that verifies, rotation). The UNet inside one: files/models.py.

Ours hold {format, model, ema, optimizer, scheduler, step, rng, data, config, ...}; the authors'
hold {net_model, ema_model, sched, optim, step, fixed_x_T} and no model config (it lives in their
flagfile.txt). Everything is saved as tensors and plain Python values so
``torch.load(weights_only=True)`` can read it safely.

Integrity: the files we write end with a 48-byte trailer (cbdm_fast.files.integrity) holding the sha256 of
everything before it, so a truncated file or a flipped byte is reported as such by ``load`` instead of
surfacing (or not) deep inside torch.load; plain ``torch.load`` still reads them. ``newest_good``
picks the newest checkpoint of a run folder that verifies, which is what ``--resume`` falls back to;
``rotate`` keeps the newest that verify and moves the others that do not aside.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import integrity
from .atomic import atomic_write

FORMAT = "cbdm_fast/1"
CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
# the temporary name atomic_write gives a checkpoint while it is written: .ckpt_<step>.pt.tmp<pid>
TMP_PATTERN = re.compile(r"^\.ckpt_\d+\.pt\.tmp(\d+)$")
INTEGRITY_KEY = "_integrity"  # stored in our dict payloads: a file that lacks its trailer was altered


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not in a format this project knows."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's bytes are not the bytes that were written (checksum mismatch, truncation)."""


def save_atomic(obj: Any, path) -> Path:
    """torch.save through a temporary file, fsync and rename (see cbdm_fast.files.atomic), ending the file
    with a sha256 trailer. A dict payload also records that it has a trailer (INTEGRITY_KEY)."""
    if isinstance(obj, dict):
        obj = {**obj, INTEGRITY_KEY: integrity.SCHEME}

    def write(f):
        hashing = integrity.HashingWriter(f)
        torch.save(obj, hashing)
        f.write(hashing.trailer())
    return atomic_write(path, write)


def verify(path) -> bool:
    """True when ``path`` ends with a trailer whose checksum matches; False when it has no trailer
    (the authors' files, or files written before trailers existed). Raises CorruptCheckpoint when a
    trailer is there and does not match, and CheckpointError when the path is missing or is a folder."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return integrity.verify_file(path)
    except integrity.ChecksumMismatch as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load(path, map_location="cpu") -> dict:
    """torch.load after the checksum check, with a clear error for a missing, truncated, altered or
    foreign file (CheckpointError; CorruptCheckpoint when the bytes are not the ones written)."""
    path = Path(path)
    has_trailer = verify(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a "
                              f"torch checkpoint ({_load_failure(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj.pop(INTEGRITY_KEY, None) is not None and not has_trailer:
        # a complete torch file whose trailer is gone: cut short by exactly its trailer, or loaded and
        # re-saved with plain torch.save (contents kept, trailer dropped); the bytes cannot tell which
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or was re-saved: cbdm_fast wrote it with a "
                                f"sha256 trailer, which is missing, so its contents cannot be verified. Either "
                                f"the file lost its last {integrity.TRAILER_SIZE} bytes, or it was re-saved with "
                                f"plain torch.save (which drops the trailer); in that case torch.load reads it, or "
                                f"re-save it with cbdm_fast.files.checkpoint.save_atomic")
    return obj


def _load_failure(exc: Exception) -> str:
    """What torch.load said, without its advice to retry with weights_only=False: that would run whatever
    code a foreign file pickles, and cannot make a torn or random file a checkpoint."""
    text = str(exc).strip()
    if "weights_only" in text or not text:
        return f"torch.load raised {type(exc).__name__}"
    return f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0][:300]}"


def newest_good(logdir, log: Optional[Callable[[str], None]] = None) -> tuple[Optional[Path], list]:
    """The newest ckpt_<step>.pt of ``logdir`` that loads and verifies, and [(path, reason)] for the
    newer ones that did not (each reported through ``log``). (None, skipped) when none is good."""
    skipped = []
    for path in reversed(find_checkpoints(logdir)):
        try:
            load(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            if log is not None:
                log(f"warning: skipping {path.name}: {exc}")
            continue
        return path, skipped
    return None, skipped


def remove_stale_temporaries(logdir) -> list[Path]:
    """Delete the temporary files of checkpoint writes whose process is gone (a run killed while it
    wrote); a live process's temporary (another run writing into the same folder) is left alone."""
    removed = []
    logdir = Path(logdir)
    if not logdir.is_dir():
        return removed
    for p in logdir.iterdir():
        m = TMP_PATTERN.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now (writes finish before returning)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_ours(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def find_checkpoints(logdir) -> list[Path]:
    """ckpt_<step>.pt files in ``logdir``, oldest step first."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in logdir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(logdir, step: int) -> Path:
    return Path(logdir) / f"ckpt_{step}.pt"


CORRUPT_FOLDER = "corrupt"  # where rotation moves checkpoints that do not verify


def rotate(logdir, keep: int, written: Path, log: Optional[Callable[[str], None]] = None) -> dict:
    """Keep the newest ``keep`` checkpoints of ``logdir`` that VERIFY, ``written`` (the one just saved)
    always among them; delete older good ones. A checkpoint that does not verify (torn by a killed write,
    altered) is never counted as one of the kept and never deleted: it is moved to <logdir>/corrupt/
    and reported through ``log``, so a bad newest file cannot push the last good one out.
    Returns {"kept": [...], "deleted": [...], "moved": [...]} (paths, oldest first)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoint, got {keep}")
    written = Path(written)
    good, moved = [], []
    for path in find_checkpoints(logdir):
        if path == written:
            good.append(path)  # verified by its own atomic write just now: no need to read it back
            continue
        try:
            if not verify(path):  # no trailer (older files): only unpickling it shows it is whole
                load(path)
        except CheckpointError as exc:
            target = Path(logdir) / CORRUPT_FOLDER / path.name
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
            if log is not None:
                log(f"warning: {path.name} does not verify ({exc}); moved to {target}")
            continue
        good.append(path)
    kept = good[-keep:]
    if written not in kept:  # a newer good checkpoint than the one just written (a rerun into old steps)
        kept = good[-(keep - 1):] + [written] if keep > 1 else [written]
    deleted = [p for p in good if p not in kept]
    for path in deleted:
        path.unlink(missing_ok=True)
    return {"kept": kept, "deleted": deleted, "moved": moved}
