"""Builders of small fake data sets with the real on-disk layouts, for the data-layer tests."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CIFAR = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch", meta="batches.meta",
                    names_key="label_names", labels_key="labels", classes=10),
    "cifar100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python", train=["train"], test="test",
                     meta="meta", names_key="fine_label_names", labels_key="fine_labels", classes=100),
}
# Planted in the first training image: (channel, row, col) -> value.
PLANTED = {(0, 2, 5): 200, (1, 7, 1): 100}


def fake_cifar_batches(name: str, per_batch: int = 10, seed: int = 0) -> dict[str, dict]:
    """file name -> the dict the real archive pickles (str keys, N x 3072 uint8 CHW rows, list labels)."""
    spec = CIFAR[name]
    rng = np.random.RandomState(seed)
    c = spec["classes"]
    files = {}
    train_per_file = per_batch if name == "cifar10" else per_batch * 5
    for i, f in enumerate(spec["train"] + [spec["test"]]):
        n = train_per_file if f != spec["test"] else per_batch
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(x) for x in (np.arange(n) + i * n) % c]
        if i == 0:
            data[0] = 0
            for (ch, r, col), v in PLANTED.items():
                data[0, ch * 1024 + r * 32 + col] = v
        d = {"batch_label": f"fake {f}", "data": data, spec["labels_key"]: labels,
             "filenames": [f"img_{j}.png" for j in range(n)]}
        if name == "cifar100":
            d["coarse_labels"] = [x // 5 for x in labels]
        files[f] = d
    meta = {spec["names_key"]: [f"class_{k}" for k in range(c)]}
    if name == "cifar10":
        meta.update(num_cases_per_batch=per_batch, num_vis=3072)
    else:
        meta["coarse_label_names"] = [f"super_{k}" for k in range(20)]
    files[spec["meta"]] = meta
    return files


def write_cifar_archive(dest: Path, name: str, per_batch: int = 10, reverse: bool = False) -> Path:
    """dest/<archive name> holding <folder>/<files>, gzip-compressed like the real download.

    reverse: store the members in reverse order (the real archive does not store them sorted).
    """
    spec = CIFAR[name]
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / spec["archive"]
    with tarfile.open(path, "w:gz") as tf:
        dirinfo = tarfile.TarInfo(spec["folder"])
        dirinfo.type = tarfile.DIRTYPE
        tf.addfile(dirinfo)
        items = list(fake_cifar_batches(name, per_batch).items())
        for f, d in reversed(items) if reverse else items:
            raw = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"{spec['folder']}/{f}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def write_cifar_folder(dest: Path, name: str, per_batch: int = 10) -> Path:
    """dest/<folder>/<files>: the extracted archive."""
    folder = dest / CIFAR[name]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    for f, d in fake_cifar_batches(name, per_batch).items():
        (folder / f).write_bytes(pickle.dumps(d, protocol=2))
    return folder
