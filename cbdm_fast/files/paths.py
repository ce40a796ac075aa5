"""Paths from the command line checked before any work starts, with messages that name the flag: a folder
given where a file is expected (or a file where a folder is), a file among the parent folders, a place this
user cannot write. Nothing is left behind here: a refused run leaves no empty folder."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class PathError(ValueError):
    """A path given for ``flag`` cannot serve; the message names the flag and says why."""


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (the folder that new ones would be created in)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str, given: Path) -> None:
    """The missing part of ``path`` can be created and written: its nearest existing ancestor is a
    writable folder."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise PathError(f"{flag} {given}: {existing} is a file, not a folder")
    try:  # a nameless file, gone when closed: the one test that also holds for root and read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        why = f" ({exc.strerror})" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC) else ""
        raise PathError(f"{flag} {given}: cannot write in {existing}{why}") from None


def check_output_file(path, flag: str, example: str = "") -> Path:
    """``path`` can be written as a file (its folders are created later): it is not a folder, no parent
    is a file, and an existing file may be replaced. ``example``: a file name the message suggests
    inside a folder given by mistake. Returns it as a Path."""
    given = Path(path)
    path = given.expanduser()
    if path.is_dir():
        hint = f" (e.g. {given / example})" if example else ""
        raise PathError(f"{flag} {given} is a folder; give a file name{hint}")
    _check_creatable(path.parent, flag, given)
    if path.exists() and not os.access(path, os.W_OK):
        raise PathError(f"{flag} {given}: the file exists and cannot be overwritten (permission denied)")
    return path


def check_output_folder(path, flag: str) -> Path:
    """``path`` is a writable folder or can be created as one. Returns it as a Path."""
    given = Path(path)
    path = given.expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{flag} {given} is a file, not a folder")
    _check_creatable(path, flag, given)
    return path


def check_input_file(path, flag: str) -> Path:
    """``path`` is a file that exists (not a folder). Returns it as a Path."""
    given = Path(path)
    path = given.expanduser()
    if path.is_dir():
        raise PathError(f"{flag} {given} is a folder, not a file")
    if not path.exists():
        raise PathError(f"{flag} {given}: no such file")
    return path
