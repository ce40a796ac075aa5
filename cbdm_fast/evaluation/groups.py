"""Long-tail reporting: many / medium / few-shot class groups and per-class metrics.

    group_classes(train_counts, many=100, few=20) -> {"many": [...], "medium": [...], "few": [...]}
        many: count > many; few: count < few; medium: few <= count <= many (the usual Many/Medium/Few
        split of long-tailed recognition, thresholds configurable).
    class_counts(labels, num_classes=None)        -> per-class training counts from a label vector
    per_class_fid(real, real_labels, fake, fake_labels, classes=None)            -> {class: FID}
    per_class_precision_recall(real, real_labels, fake, fake_labels, k=5, ...)  -> ({class: P}, {class: R})
    group_average(per_class_values, groups)       -> {"many": mean, "medium": mean, "few": mean, "all": mean}
    grouped_fid(real, real_labels, fake, fake_labels, groups) -> {group: FID of the pooled group's samples}
Classes with too few samples for a metric get NaN; group_average skips NaN and missing classes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .fid import feature_stats, fid_from_stats
from .knn import as_features
from .precision_recall import improved_precision_recall

__all__ = ["group_classes", "class_counts", "per_class_fid", "per_class_precision_recall",
           "group_average", "grouped_fid", "GROUPS"]

GROUPS = ("many", "medium", "few")


def class_counts(labels, num_classes: int | None = None) -> list[int]:
    """Number of samples of each class 0..num_classes-1 in an integer label vector."""
    y = _labels(labels, "labels")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got min {int(y.min())}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.numel() else 0
    n = int(num_classes)
    if y.numel() and int(y.max()) >= n:
        raise ValueError(f"labels contain class {int(y.max())} >= num_classes = {n}")
    return torch.bincount(y.cpu(), minlength=n).tolist()


def group_classes(train_counts, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Split classes by training-set count: many (> many), medium (few..many inclusive), few (< few).

    train_counts: a sequence (tensor, array, list) indexed by class, or a dict {class: count}.
    """
    if few > many:
        raise ValueError(f"need few <= many, got few={few}, many={many}")
    if isinstance(train_counts, dict):
        items = sorted(train_counts.items())
    else:
        counts = train_counts.tolist() if hasattr(train_counts, "tolist") else list(train_counts)
        items = list(enumerate(counts))
    out = {g: [] for g in GROUPS}
    for cls, count in items:
        if count < 0:
            raise ValueError(f"train_counts must be non-negative, class {cls} has {count}")
        out["many" if count > many else "few" if count < few else "medium"].append(int(cls))
    return out


def _labels(labels, name: str) -> torch.Tensor:
    y = torch.from_numpy(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer vector, got shape {tuple(y.shape)}, dtype {y.dtype}")
    return y.long()


def _split(feats, labels, fname: str, lname: str):
    x = as_features(feats, fname)
    y = _labels(labels, lname).to(x.device)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{lname} has {y.shape[0]} entries but {fname} has {x.shape[0]} rows")
    return x, y


def _prepare(real, real_labels, fake, fake_labels, classes):
    xr, yr = _split(real, real_labels, "real", "real_labels")
    xf, yf = _split(fake, fake_labels, "fake", "fake_labels")
    if xr.shape[1] != xf.shape[1]:
        raise ValueError(f"real and fake must have the same feature dimension, got {xr.shape[1]} and {xf.shape[1]}")
    if classes is None:
        classes = torch.unique(yr).tolist()
    return xr, yr, xf, yf, [int(c) for c in classes]


def per_class_fid(real, real_labels, fake, fake_labels, classes=None) -> dict[int, float]:
    """{class: FID between the real and the fake features of that class} (NaN below 2 samples a side).

    classes: the classes to report (default: every class present in real_labels). FID is biased
    upward for small sample counts, so compare per-class values only at equal counts.
    """
    xr, yr, xf, yf, classes = _prepare(real, real_labels, fake, fake_labels, classes)
    out = {}
    for c in classes:
        a, b = xr[yr == c], xf[yf == c]
        if a.shape[0] < 2 or b.shape[0] < 2:
            out[c] = math.nan
            continue
        out[c] = fid_from_stats(*feature_stats(a), *feature_stats(b))
    return out


def per_class_precision_recall(real, real_labels, fake, fake_labels, k: int = 5, chunk: int | None = None,
                               classes=None) -> tuple[dict[int, float], dict[int, float]]:
    """({class: precision}, {class: recall}), improved P/R within each class (NaN below k+1 samples a side)."""
    xr, yr, xf, yf, classes = _prepare(real, real_labels, fake, fake_labels, classes)
    precision, recall = {}, {}
    for c in classes:
        a, b = xr[yr == c], xf[yf == c]
        if a.shape[0] <= k or b.shape[0] <= k:
            precision[c] = recall[c] = math.nan
            continue
        precision[c], recall[c] = improved_precision_recall(a, b, k=k, chunk=chunk)
    return precision, recall


def group_average(per_class_values: dict, groups: dict[str, list[int]]) -> dict[str, float]:
    """Mean of a per-class metric over each group, plus "all" over every grouped class.

    NaN values and classes missing from per_class_values are skipped; an empty group gives NaN.
    """
    def mean(classes):
        vals = [float(per_class_values[c]) for c in classes
                if c in per_class_values and not math.isnan(float(per_class_values[c]))]
        return float(np.mean(vals)) if vals else math.nan

    out = {g: mean(cls) for g, cls in groups.items()}
    out["all"] = mean([c for cls in groups.values() for c in cls])
    return out


def grouped_fid(real, real_labels, fake, fake_labels, groups: dict[str, list[int]]) -> dict[str, float]:
    """{group: FID between all real and all fake samples of the group's classes, pooled}.

    The pooled variant of Many/Medium/Few-shot FID (group_average of per_class_fid is the other one).
    NaN when a side has fewer than 2 samples in the group.
    """
    xr, yr, xf, yf, _ = _prepare(real, real_labels, fake, fake_labels, [])
    out = {}
    for g, classes in groups.items():
        cls = torch.as_tensor(list(classes), dtype=torch.long, device=xr.device)
        a, b = xr[torch.isin(yr, cls)], xf[torch.isin(yf, cls.to(yf.device))]
        out[g] = (fid_from_stats(*feature_stats(a), *feature_stats(b))
                  if a.shape[0] >= 2 and b.shape[0] >= 2 else math.nan)
    return out
