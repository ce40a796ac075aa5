"""Resumable sampling runs: images written in shards, a manifest saying what the run is.

A run of N images is split into shards of ``shard_size`` consecutive global sample indices
[i * shard_size, min((i + 1) * shard_size, N)). Each finished shard is written atomically as
``shard_00000.npz`` ... (images uint8 (n, H, W, C), labels int64 (n,), start, stop) into a folder
beside the output, with ``manifest.json`` holding the run's key (every argument that changes the
images). A killed run restarted with the same arguments finds the folder, checks that the key
matches (a mismatch is an error naming the differing flags), skips the shards already on disk and
samples the rest. Because every sample's noise is a function of (seed, global index) alone, the
resumed run yields exactly the images of an uninterrupted one, whatever the batch size, and whatever
number of torchrun ranks shared the shards out (sampling/run.py: rank 0 opens the folder, each rank
writes its own shards (``rank_shards``), rank 0 merges).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..files.atomic import atomic_write

FORMAT = "cbdm_fast.sample-shards/1"
MANIFEST = "manifest.json"


class ShardMismatch(ValueError):
    """An existing shard folder belongs to a run with other arguments."""


def shards_folder(out: Path) -> Path:
    """The shard folder of the output file ``out``: ``<out stem>.shards`` beside it."""
    out = Path(out)
    return out.parent / f"{out.stem}.shards"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npz"


def plan(n: int, shard_size: int) -> list:
    """[(start, stop), ...] of the shards of n images."""
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def rank_shards(pending: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of the pending shards: every world_size-th one, starting at its rank. Any
    assignment gives the same images (noise depends on the global index only); this one is fixed and
    balanced also when resuming with other ranks."""
    return pending[rank::world_size]


def weights_digest(state_dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (identifies the weights used)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        v = state_dict[name]
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _describe(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


class ShardRun:
    """The shard folder of one run. ``key``: {flag or field name: JSON value}, compared on resume."""

    def __init__(self, folder, key: dict, n: int, shard_size: int, image_shape):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key))  # normalise (tuples -> lists) for comparison
        self.n, self.shard_size, self.image_shape = n, shard_size, tuple(image_shape)
        self.shards = plan(n, shard_size)

    # ----------------------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        return {"format": FORMAT, "key": self.key, "n": self.n, "shard_size": self.shard_size,
                "image_shape": list(self.image_shape), "shards": [list(s) for s in self.shards]}

    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def has_manifest(self) -> bool:
        """Whether the manifest is there (under torchrun: whether this rank sees the folder rank 0 opened)."""
        return self.manifest_path().is_file()

    def open(self) -> list:
        """Create the folder and manifest, or check an existing one; returns the indices of the shards
        still to sample. Raises ShardMismatch (a ValueError) when the folder is another run's."""
        path = self.manifest_path()
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ShardMismatch(f"cannot read {path} ({exc}): delete {self.folder} to start afresh") from exc
            self._compare(old)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write((json.dumps(self.manifest(), indent=1) + "\n").encode()))
        return [i for i in range(len(self.shards)) if not self.complete(i)]

    def _compare(self, old: dict) -> None:
        if old.get("format") != FORMAT:
            raise ShardMismatch(f"{self.folder / MANIFEST} is not a manifest of this program "
                                f"(format {old.get('format')!r}): delete {self.folder} or choose another --out")
        old_key = dict(old.get("key") or {})
        old_key.setdefault("--shard-size", old.get("shard_size"))
        new_key = dict(self.key)
        new_key.setdefault("--shard-size", self.shard_size)
        diffs = []
        for name in sorted(set(old_key) | set(new_key)):
            a, b = old_key.get(name), new_key.get(name)
            if a != b:
                diffs.append(f"{name}: the interrupted run used {_describe(a)}, this one {_describe(b)}")
        if diffs:
            raise ShardMismatch(f"{self.folder} holds shards of a run with other arguments -- "
                                + "; ".join(diffs) + f". Resume with the same arguments, choose another --out, "
                                f"or delete {self.folder} to start afresh")

    # ----------------------------------------------------------------------------- shards
    def path(self, i: int) -> Path:
        return self.folder / shard_name(i)

    def read(self, i: int) -> Optional[dict]:
        """The shard's arrays, or None when it is missing or does not fit the plan."""
        path = self.path(i)
        if not path.is_file():
            return None
        start, stop = self.shards[i]
        try:
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
        except Exception:  # a foreign or damaged file: sample the shard again
            return None
        ok = (set(d) >= {"images", "labels", "start", "stop"} and int(d["start"]) == start
              and int(d["stop"]) == stop and d["images"].shape == (stop - start,) + self.image_shape
              and d["images"].dtype == np.uint8 and d["labels"].shape == (stop - start,))
        return d if ok else None

    def complete(self, i: int) -> bool:
        return self.read(i) is not None

    def write(self, i: int, images: np.ndarray, labels: np.ndarray) -> Path:
        start, stop = self.shards[i]
        if images.shape != (stop - start,) + self.image_shape:
            raise ValueError(f"shard {i} needs images of shape {(stop - start,) + self.image_shape}, "
                             f"got {images.shape}")
        return atomic_write(self.path(i), lambda f: np.savez(
            f, images=images, labels=np.asarray(labels, dtype=np.int64), start=np.int64(start),
            stop=np.int64(stop)))

    def merge(self):
        """(images, labels) of all shards, in global index order."""
        images = np.empty((self.n,) + self.image_shape, dtype=np.uint8)
        labels = np.empty((self.n,), dtype=np.int64)
        for i, (start, stop) in enumerate(self.shards):
            d = self.read(i)
            if d is None:
                raise ValueError(f"shard {i} ({self.path(i)}) is missing or damaged")
            images[start:stop], labels[start:stop] = d["images"], d["labels"]
        return images, labels

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
