"""The built-in default data set: scikit-learn's 1797 real 8x8 handwritten digits, long-tailed.

No download, 10 classes, small enough to train and evaluate on a CPU in minutes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .images import LabeledImages
from .longtail import check_imb, make_longtail
from .resize import RESAMPLE, check_size

SPLITS = ("train", "test", "train_full")
TEST_FRACTION = 0.2


def digits_split_indices(labels: np.ndarray, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the scikit-learn arrays: a stratified, deterministic split.

    Per class (in class order) a permutation from one RandomState(seed); its first
    floor(20%) go to test, the rest to train. Both come back class by class, sorted within a class.
    """
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(len(idx) * TEST_FRACTION)
        test.append(np.sort(idx[:n_test]))
        train.append(np.sort(idx[n_test:]))
    return np.concatenate(train), np.concatenate(test)


def _upscale(images8: np.ndarray, size: int) -> np.ndarray:
    """0..16 floats (N x 8 x 8) -> N x size x size x 1 uint8 in 0..255, bicubic in float then rounded."""
    scaled = images8.astype(np.float32) * (255.0 / 16.0)
    if size != scaled.shape[1]:
        scaled = np.stack([np.asarray(Image.fromarray(im, mode="F").resize((size, size), RESAMPLE)) for im in scaled])
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)[..., None]


def load_digits_lt(imb_factor: float = 0.1, imb_type: str = "exp", image_size: int = 16,
                   split: str = "train") -> LabeledImages:
    """Digits as N x image_size x image_size x 1 uint8, class names '0'..'9'.

    split='train': the long-tailed training set (class 0 is the head); 'train_full': the balanced
    training part; 'test': the balanced held-out 20%, for evaluation. The long-tailed selection is
    make_longtail(seed 0) with n_max = the smallest training class, so every class has enough images
    and the tail/head ratio is imb_factor (the training classes hold 140..147 images).
    """
    from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed for this data set

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    imb_factor = check_imb(imb_type, imb_factor)
    size = check_size(image_size)
    raw = load_digits()
    labels = raw.target.astype(np.int64)
    train_idx, test_idx = digits_split_indices(labels)
    idx = test_idx if split == "test" else train_idx
    data = LabeledImages(_upscale(raw.images[idx], size), labels[idx], 10, [str(c) for c in range(10)])
    if split != "train":
        return data
    return make_longtail(data, imb_type, imb_factor, seed=0, n_max=float(data.counts().min()))
