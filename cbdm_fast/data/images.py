"""The in-memory labelled image set every loader returns, and the shared error type."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DatasetError(ValueError):
    """A data set on disk is missing, truncated or not laid out as expected.

    A ValueError so that callers that only know "bad input" still catch it; the message
    names the path and the expected layout.
    """


@dataclass
class LabeledImages:
    """uint8 images in HWC layout (N x H x W x C, C = 1 or 3) with int64 labels in [0, num_classes)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"images must be N x H x W x C with C in (1, 3), got shape {images.shape}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        num_classes = int(self.num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"label {int(labels[i])} at index {i} is outside [0, {num_classes})")
        names = [str(n) for n in self.class_names] if self.class_names else [str(c) for c in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.images, self.labels, self.num_classes, self.class_names = images, labels, num_classes, names

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def counts(self) -> np.ndarray:
        """Images per class, length num_classes (zeros included)."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices) -> "LabeledImages":
        """The images at `indices` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledImages(self.images[idx], self.labels[idx], self.num_classes, list(self.class_names))
