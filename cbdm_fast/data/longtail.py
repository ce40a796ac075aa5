"""Long-tailed subsets, selected exactly as the CBDM authors (and LDAM before them) do."""

from __future__ import annotations

import warnings

import numpy as np

from .images import DatasetError, LabeledImages

IMB_TYPES = ("exp", "step", "none")


def check_imb(imb_type: str, imb_factor) -> float:
    if imb_type not in IMB_TYPES:
        raise ValueError(f"imb_type must be one of {IMB_TYPES}, got {imb_type!r}")
    try:
        f = float(imb_factor)
    except (TypeError, ValueError):
        raise ValueError(f"imb_factor must be a number in (0, 1], got {imb_factor!r}") from None
    if not 0.0 < f <= 1.0:  # also rejects nan
        raise ValueError(f"imb_factor must be in (0, 1] (tail/head ratio), got {imb_factor!r}")
    return f


def img_num_per_cls(n_max: float, num_classes: int, imb_type: str, imb_factor: float) -> list[int]:
    """Images kept per class; class 0 is the head.

    exp:  int(n_max * imb_factor ** (c / (C - 1)))
    step: int(n_max) for the first C // 2 classes, int(n_max * imb_factor) for the rest
    none: int(n_max) for every class
    n_max is a float (the authors pass len(data) / C) and int() truncates, as theirs does.
    """
    imb_factor = check_imb(imb_type, imb_factor)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if imb_type == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if imb_type == "step":
        head = num_classes // 2
        # For odd C the authors' list is one short (the last class gets nothing); we give it the tail count.
        return [int(n_max)] * head + [int(n_max * imb_factor)] * (num_classes - head)
    return [int(n_max)] * num_classes


def longtail_indices(labels: np.ndarray, num_classes: int, imb_type: str = "exp", imb_factor: float = 0.01,
                     seed: int = 0, n_max: float | None = None) -> np.ndarray:
    """Indices of the long-tailed subset, classes concatenated in class order.

    The authors' loop: np.random.seed(seed); per class c in order: idx = where(labels == c);
    shuffle(idx); keep idx[:n_c]. A RandomState(seed) object draws the same stream without
    touching numpy's global state.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n_max is None:
        n_max = len(labels) / num_classes
    wanted = img_num_per_cls(n_max, num_classes, imb_type, imb_factor)
    rng = np.random.RandomState(seed)
    keep, short = [], []
    for c, n_c in enumerate(wanted):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        if len(idx) < n_c:
            short.append((c, len(idx), n_c))
        keep.append(idx[:n_c])
    if short:
        detail = ", ".join(f"class {c} has {have} < {want}" for c, have, want in short)
        warnings.warn(f"long-tailed split: keeping every image of classes with too few ({detail})", stacklevel=3)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def make_longtail(data: LabeledImages, imb_type: str = "exp", imb_factor: float = 0.01, seed: int = 0,
                  n_max: float | None = None) -> LabeledImages:
    """The long-tailed subset of `data` (see longtail_indices); n_max defaults to len(data) / num_classes.

    DatasetError when the split would leave a class without images (a class the model could never learn
    and the evaluation could never score): the message names those classes and counts and the smallest
    --imb-factor, or the number of images per class, that keeps one image of every class."""
    if n_max is None:
        n_max = len(data.labels) / data.num_classes
    idx = longtail_indices(data.labels, data.num_classes, imb_type, imb_factor, seed, n_max)
    subset = data.subset(idx)
    counts = subset.counts()
    empty = [c for c in range(data.num_classes) if counts[c] == 0]
    if empty:
        have = data.counts()
        names = [data.class_names[c] if c < len(data.class_names) else str(c) for c in empty]
        listed = ", ".join(f"{n} (0 of {int(have[c])})" for n, c in zip(names[:10], empty))
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        f = check_imb(imb_type, imb_factor)
        rule = (f"int({n_max:g} * imb_factor ** (c / (C - 1))) images of class c" if imb_type == "exp" else
                f"int({n_max:g} * imb_factor) images of each of the last {data.num_classes - data.num_classes // 2} "
                f"classes")
        raise DatasetError(
            f"the long-tailed split ({imb_type}, imb_factor {f:g}) keeps no image of {len(empty)} of "
            f"{data.num_classes} classes: {listed}{more}. It keeps {rule}, where {n_max:g} is the images per "
            f"class of the data set; use --imb-factor >= {min(1.0, 1.0 / n_max):.3g} or at least "
            f"{int(np.ceil(1.0 / f))} images per class")
    return subset
