""".npz archives opened with messages that say what a file is when it is not one: numpy alone calls any
file that is neither a zip nor an .npy file "pickled (object) data" and suggests allow_pickle, which would
run whatever code such a file holds."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty archive
NPY_MAGIC = b"\x93NUMPY"


class NpzError(ValueError):
    """A file that cannot be read as an .npz archive; the message says what it is."""


def open_npz(path):
    """``np.load(path)`` of an .npz archive (never unpickling; use it as a context manager), or
    NpzError: missing, a folder, empty, a single .npy array, not a zip file at all, a damaged archive."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise NpzError(f"{p} is a folder, not an .npz file")
    try:
        with open(p, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise NpzError(f"{p}: no such file") from None
    except OSError as exc:
        raise NpzError(f"cannot read {p}: {exc.strerror or exc}") from None
    if not head:
        raise NpzError(f"cannot read {p}: the file is empty")
    if head.startswith(NPY_MAGIC):
        raise NpzError(f"cannot read {p}: it is a single .npy array, not an .npz archive")
    if not head.startswith(ZIP_MAGIC):
        raise NpzError(f"cannot read {p}: not an .npz archive (an .npz is a zip file, and this one does not "
                       f"start like one)")
    try:
        return np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise NpzError(f"cannot read {p}: the .npz archive is damaged or truncated ({type(exc).__name__}: "
                       f"{exc})") from None
