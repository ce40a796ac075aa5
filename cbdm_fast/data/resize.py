"""Resizing with Pillow's bicubic filter (never nearest: it aliases and shifts pixels)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .images import LabeledImages

RESAMPLE = Image.Resampling.BICUBIC


def center_square(img: Image.Image) -> Image.Image:
    """Crop the largest centred square, so a later resize does not distort the aspect ratio."""
    w, h = img.size
    if w == h:
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def resize_pil(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to size x size (bicubic)."""
    img = center_square(img)
    return img if img.size == (size, size) else img.resize((size, size), RESAMPLE)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize N x H x W x C uint8 images to N x size x size x C."""
    if images.shape[1:3] == (size, size):
        return images
    c = images.shape[3]
    out = np.empty((images.shape[0], size, size, c), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(im[..., 0] if c == 1 else im, mode="L" if c == 1 else "RGB")
        arr = np.asarray(resize_pil(pil, size))
        out[i] = arr[..., None] if c == 1 else arr
    return out


def resize_dataset(data: LabeledImages, size: int | None) -> LabeledImages:
    """The same data set with every image resized to size x size (None or same size: unchanged)."""
    if size is None:
        return data
    size = check_size(size)
    if data.images.shape[1:3] == (size, size):
        return data
    return LabeledImages(resize_uint8(data.images, size), data.labels, data.num_classes, list(data.class_names))


def check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image_size must be a positive integer, got {size!r}")
    return int(size)
