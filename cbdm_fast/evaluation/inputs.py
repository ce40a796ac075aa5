"""What an evaluation scores: the generated images (the .npz of python -m cbdm_fast.sample, checked
with messages that say what is wrong) and the real data sets they are compared with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files.arrays import NpzError, open_npz

NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "cifar10lt": 32, "cifar100lt": 32}
NATIVE_CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "cifar10lt": 3, "cifar100lt": 3}
SAMPLE_HINT = ("expected the .npz written by python -m cbdm_fast.sample: 'images' uint8 (N, H, W, C) and "
               "'labels' int (N,)")


class EvalError(ValueError):
    """Bad input to the evaluation (file, labels, sizes, flags); the CLI prints it and exits with 2."""


def load_samples(path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(images uint8 (N, H, W, C), labels int64 (N,) or None when unlabelled, scalar metadata)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"samples file not found: {p}")
    if p.is_dir():
        raise EvalError(f"{p} is a folder; {SAMPLE_HINT}")
    try:
        data = open_npz(p)
    except NpzError as exc:
        raise EvalError(f"{exc}; {SAMPLE_HINT}") from None
    meta = {}
    try:
        with data:
            if "images" not in data.files:
                raise EvalError(f"{p} has no 'images' array (it holds {data.files}); {SAMPLE_HINT}")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
            for key in data.files:
                if key in ("images", "labels"):
                    continue
                try:
                    v = data[key]
                except Exception:
                    continue
                if v.ndim == 0 and v.dtype.kind in "biufU":
                    meta[key] = v.item()
    except EvalError:
        raise
    except Exception as exc:  # a truncated or corrupt member (zlib, CRC, header errors)
        raise EvalError(f"cannot read {p}: the archive is corrupt ({type(exc).__name__}: {exc}); "
                        f"{SAMPLE_HINT}") from None
    if images.dtype != np.uint8:
        raise EvalError(f"{p}: images have dtype {images.dtype}; expected uint8 pixels 0..255 "
                        f"(x in [-1, 1] maps to round((x + 1) * 127.5))")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise EvalError(f"{p}: images have shape {images.shape}; expected (N, H, W, C) with C = 1 or 3")
    if images.shape[0] == 0:
        raise EvalError(f"{p}: no images")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise EvalError(f"{p}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise EvalError(f"{p}: {images.shape[0]} images but {labels.shape[0]} labels")
        labels = labels.astype(np.int64)
        if (labels == -1).all():
            labels = None  # unconditional samples (python -m cbdm_fast.sample --method uncond)
    return images, labels, meta


def check_labels(labels: np.ndarray, num_classes: int, dataset: str, path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise EvalError(f"{path}: label {int(labels[i])} at index {i} is out of range: --dataset {dataset} has "
                        f"classes 0..{num_classes - 1} ({bad.size} bad label(s))")


def load_real(args, size: int, channels: int):
    """(long-tailed training set, reference set, downstream test set, reference description); EvalError
    also for a data set that cannot be loaded (a missing --data-root, a bad archive)."""
    try:
        return _real_sets(args, size, channels)
    except EvalError:
        raise
    except ValueError as exc:  # DatasetError and friends
        raise EvalError(str(exc)) from None


def _real_sets(args, size: int, channels: int):
    from ..data import load_dataset, load_digits_lt

    name = args.dataset
    reference = args.reference
    if name == "digits":
        if channels != 1:
            raise EvalError(f"the samples have {channels} channels but --dataset digits images are grey (1 channel)")
        train = load_dataset("digits", imb_factor=args.imb_factor, imb_type=args.imb_type, image_size=size)
        test = load_digits_lt(split="test", image_size=size)
        if reference in ("auto", "test"):
            return train, test, test, "digits held-out test split (balanced)"
        return train, load_digits_lt(split="train_full", image_size=size), test, \
            "digits training split (balanced, before the long-tailed selection)"
    root = args.data_root
    resize = None if size == NATIVE_SIZE.get(name) else size
    if name.startswith("cifar"):
        if channels != 3:
            raise EvalError(f"the samples have {channels} channel(s) but CIFAR images are RGB (3 channels)")
        base = name.removesuffix("lt")
        lt = name.endswith("lt")
        train = load_dataset(name, root, imb_factor=args.imb_factor if lt else None, imb_type=args.imb_type,
                             image_size=resize)
        test = load_dataset(base, root, image_size=resize, train=False)
        if reference in ("auto", "train"):
            ref = train if not lt else load_dataset(base, root, image_size=resize)
            return train, ref, test, f"{base} training set (balanced, all {len(ref)} images)"
        return train, test, test, f"{base} test set"
    lt = name == "folderlt"
    train = load_dataset(name, root, imb_factor=args.imb_factor if lt else None, imb_type=args.imb_type,
                         image_size=size, channels=channels)
    whole = load_dataset("folder", root, image_size=size, channels=channels)
    return train, whole, whole, f"the whole image folder {root} ({len(whole)} images; not held out)"


@dataclass
class Inputs:
    """The generated images and the real data sets they are scored against."""
    images: np.ndarray
    labels: np.ndarray | None
    meta: dict
    size: int
    channels: int
    train: object
    ref: object
    test: object
    ref_desc: str


def load_inputs(args, log) -> Inputs:
    """Read and check the samples, then load the real data (raises EvalError)."""
    images, labels, meta = load_samples(args.samples)
    n, h, w, c = images.shape
    size = args.image_size or NATIVE_SIZE.get(args.dataset, h)
    if (h, w) != (size, size):
        hint = (f"; if the model was trained with --image-size {h}, pass --image-size {h}" if h == w else "")
        raise EvalError(f"{args.samples}: the samples are {h}x{w} but --dataset {args.dataset} images are "
                        f"{size}x{size}{hint}")
    expected_c = NATIVE_CHANNELS.get(args.dataset)
    if expected_c is not None and c != expected_c:
        raise EvalError(f"{args.samples}: the samples have {c} channel(s) but --dataset {args.dataset} images have "
                        f"{expected_c}")
    if args.downstream and labels is None:
        raise EvalError(f"--downstream needs labelled samples, but {args.samples} has no labels (or all -1)")
    log(f"loading the {args.dataset} data set...")
    train, ref, test, ref_desc = load_real(args, size, c)
    if labels is not None:
        check_labels(labels, train.num_classes, args.dataset, args.samples)
    return Inputs(images, labels, meta, size, c, train, ref, test, ref_desc)
