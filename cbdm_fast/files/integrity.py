"""A sha256 trailer that makes a file self-verifying: a truncated file or a flipped byte is detected.

Layout: the payload, then 48 bytes = sha256(payload) (32) + payload length, little-endian uint64 (8)
+ MAGIC (8). Zip readers (torch.load included) locate a zip archive from its end-of-directory record
and tolerate these trailing bytes, so a checkpoint with a trailer stays a plain torch file.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO

SCHEME = "sha256-trailer/1"
MAGIC = b"CBDMSUM1"
_TAIL = struct.Struct("<32sQ8s")
TRAILER_SIZE = _TAIL.size  # 48
_CHUNK = 8 << 20


class ChecksumMismatch(ValueError):
    """The file's bytes do not match the checksum in its trailer."""


class HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self._f, self._hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()

    def trailer(self) -> bytes:
        return _TAIL.pack(self._hash.digest(), self.size, MAGIC)


def verify_file(path) -> bool:
    """True when ``path`` ends with a trailer that matches; False when it has none (no MAGIC at the
    end). Raises ChecksumMismatch when the trailer's length or digest disagrees with the payload."""
    path = Path(path)
    size = path.stat().st_size
    if size < TRAILER_SIZE:
        return False
    with open(path, "rb") as f:
        f.seek(size - TRAILER_SIZE)
        digest, length, magic = _TAIL.unpack(f.read(TRAILER_SIZE))
        if magic != MAGIC:
            return False
        if length != size - TRAILER_SIZE:
            raise ChecksumMismatch(f"the trailer records {length} bytes of data but the file holds "
                                   f"{size - TRAILER_SIZE} (truncated or extended)")
        f.seek(0)
        h, left = hashlib.sha256(), length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise ChecksumMismatch("the file ended early while reading it")
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != digest:
        raise ChecksumMismatch("sha256 mismatch (a byte changed after it was written)")
    return True
