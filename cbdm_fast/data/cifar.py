"""CIFAR-10 / CIFAR-100 from the standard *python* archives, read in place (no extraction).

The batches are pickles; they are loaded with an unpickler that only admits the numpy classes
an array needs, so a foreign file cannot run code, and every failure becomes a DatasetError
that names the path and the layout we expected.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import DatasetError, LabeledImages


@dataclass(frozen=True)
class CifarLayout:
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    names_key: str
    labels_key: str
    num_classes: int

    def expected(self) -> str:
        files = ", ".join(self.train_files[:1] + (("..", self.train_files[-1]) if len(self.train_files) > 1 else ()))
        files = f"{files}, {self.test_file}, {self.meta_file}"
        return f"expected {self.archive} or a folder {self.folder}/ containing {files}"


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-python.tar.gz", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                           "label_names", "labels", 10),
    "cifar100": CifarLayout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta",
                            "fine_label_names", "fine_labels", 100),
}

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1

# The only globals a pickled numpy array (Python 2 or 3, numpy 1 or 2) refers to.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch") from None


def _unpickle(raw: bytes, where: str, layout: CifarLayout) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # garbage can fail anywhere inside pickle: report it as a data set error
        raise DatasetError(f"{where}: not a readable CIFAR pickle ({type(e).__name__}: {e}); {layout.expected()}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: holds a {type(obj).__name__}, not a dict; {layout.expected()}")
    # The archives are Python 2 pickles (str keys under latin1); accept bytes keys too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _resolve(root, layout: CifarLayout) -> tuple[str, Path]:
    """('archive', file) or ('folder', dir) for every accepted form of `root`."""
    p = Path(root).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory; {layout.expected()}")
    if p.is_file():
        return "archive", p
    needed = layout.train_files + (layout.test_file, layout.meta_file)
    if p.name == layout.folder or all((p / f).is_file() for f in needed):
        return "folder", p
    if (p / layout.folder).is_dir():
        return "folder", p / layout.folder
    if (p / layout.archive).is_file():
        return "archive", p / layout.archive
    raise DatasetError(f"{p}: contains neither {layout.archive} nor {layout.folder}/; {layout.expected()}")


def _read_folder(folder: Path, files: list[str], layout: CifarLayout) -> dict[str, dict]:
    out = {}
    for f in files:
        path = folder / f
        if not path.is_file():
            raise DatasetError(f"{folder}: missing {f}; {layout.expected()}")
        out[f] = _unpickle(path.read_bytes(), str(path), layout)
    return out


def _read_archive(path: Path, files: list[str], layout: CifarLayout) -> dict[str, dict]:
    wanted = {f"{layout.folder}/{f}": f for f in files}
    out: dict[str, dict] = {}
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{path}: not a readable tar archive ({type(e).__name__}; wrong file or truncated?); {layout.expected()}") from e
    try:
        # One sequential pass: seeking backwards in a .gz stream would decompress it again.
        with tf:
            for member in tf:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in wanted and member.isfile():
                    raw = tf.extractfile(member).read()
                    out[wanted[name]] = _unpickle(raw, f"{path}:{name}", layout)
                    if len(out) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {' '.join(str(e).split())}); "
                           f"{layout.expected()}") from e
    missing = [n for n, f in wanted.items() if f not in out]
    if missing:
        raise DatasetError(f"{path}: archive lacks {', '.join(missing)} (wrong archive?); {layout.expected()}")
    return out


def _batch_arrays(batch: dict, where: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or layout.labels_key not in batch:
        raise DatasetError(f"{where}: batch lacks 'data' or '{layout.labels_key}' (keys: {sorted(map(str, batch))}); "
                           f"{layout.expected()}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[layout.labels_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DatasetError(f"{where}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; {layout.expected()}")
    if labels.shape != (data.shape[0],) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(f"{where}: {labels.shape} labels for {data.shape[0]} images; {layout.expected()}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(f"{where}: labels outside [0, {layout.num_classes}); {layout.expected()}")
    return data, labels


def load_cifar(root, name: str, train: bool = True) -> LabeledImages:
    """Load CIFAR-10 or CIFAR-100 (name 'cifar10' / 'cifar100'), train or test split.

    root: the .tar.gz archive, a directory holding it, the extracted folder, or a directory holding that.
    Images come back N x 32 x 32 x 3 uint8 (HWC); classes in the archive's label order.
    """
    if name not in LAYOUTS:
        raise ValueError(f"name must be one of {sorted(LAYOUTS)}, got {name!r}")
    layout = LAYOUTS[name]
    kind, path = _resolve(root, layout)
    files = list(layout.train_files if train else (layout.test_file,))
    batches = (_read_archive if kind == "archive" else _read_folder)(path, files + [layout.meta_file], layout)

    meta = batches[layout.meta_file]
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise DatasetError(f"{path}: {layout.meta_file} lacks {layout.num_classes} '{layout.names_key}'; "
                           f"{layout.expected()}")
    parts = [_batch_arrays(batches[f], f"{path}:{f}", layout) for f in files]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    # Rows are CHW, row-major: 1024 red, 1024 green, 1024 blue values.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return LabeledImages(images, labels, layout.num_classes, [str(n) for n in names])
