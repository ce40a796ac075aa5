"""A class-per-folder image directory: root/<class_name>/<image files>."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import DatasetError, LabeledImages
from .resize import check_size, resize_pil

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
LAYOUT = "expected root/<class_name>/<images> (png, jpg, jpeg, bmp, webp, ...)"


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def list_image_folder(root) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted) and, per class, its image files (sorted)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; {LAYOUT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DatasetError(f"{root}: no class folders; {LAYOUT}")
    files = []
    for name in classes:
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DatasetError(f"{root / name}: class folder has no images; {LAYOUT}")
        files.append(found)
    return classes, files


def _read(path: Path, mode: str, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(mode)  # forces the decode, so truncated files fail here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from e
    if size is not None:
        img = resize_pil(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_image_folder(root, image_size: int | None = None, channels: int = 3) -> LabeledImages:
    """Every image under root/<class>/, labels 0..C-1 in sorted class-name order.

    image_size: centre-crop to square and resize (bicubic) to image_size x image_size; None keeps
    the files' size, which must then be the same for all. channels: 3 (RGB) or 1 (grey).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    size = None if image_size is None else check_size(image_size)
    classes, files = list_image_folder(root)
    mode = "RGB" if channels == 3 else "L"
    images, labels, first = [], [], None
    for label, paths in enumerate(files):
        for path in paths:
            arr = _read(path, mode, size)
            if first is None:
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise DatasetError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from {first[0]} "
                                   f"({first[1][1]}x{first[1][0]}); pass image_size to resize them all")
            images.append(arr)
            labels.append(label)
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64), len(classes), classes)
