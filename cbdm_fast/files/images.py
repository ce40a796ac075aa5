"""Small image helpers over numpy and Pillow (the project has no torchvision): tensors in [-1, 1]
to uint8, image grids, PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into rows of ``nrow`` images, ``padding`` pixels apart."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N, H, W, C), got {images.dtype} {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = images.shape
    rows = max(1, -(-n // nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_png(array: np.ndarray, path, upscale: int = 1) -> Path:
    """Write an (H, W, C) uint8 array as PNG (C = 1 or 3), atomically; nearest upscaling for small images."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)


def save_grid(x: torch.Tensor, path, nrow: int, upscale: int = 1) -> Path:
    """Save a batch of [-1, 1] images as one PNG grid."""
    return save_png(make_grid(to_uint8(x), nrow), path, upscale=upscale)
