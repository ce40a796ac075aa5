"""Feature extractors for evaluation: uint8 (N, H, W, C) images -> (features, class probabilities).

    DigitsFeatures(model)            the digits recogniser's 64-d penultimate layer and its softmax over
                                     the 10 digits (IS, recognition accuracy)
    InceptionFeatures(weights_path)  the FID Inception-v3's 2048-d pool features and its 1008-way softmax
    extract(extractor, images, cache_dir=None) -> (features float32 (N, D), probs float64 (N, K)),
        cached on disk under a key of (extractor id, image bytes) when cache_dir is given (used for the
        real reference sets, which are the same run after run).
    cache_path / read_cached / write_cached: the cache's parts, for the sharded evaluation (sharding.py),
        where rank 0 alone reads and writes the cache.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from ..files.atomic import atomic_write
from .digits_classifier import SmallCNN, classifier_predict

__all__ = ["DigitsFeatures", "InceptionFeatures", "extract", "cache_path", "read_cached", "write_cached"]


class DigitsFeatures:
    """Penultimate features and softmax of a SmallCNN recogniser."""

    kind = "digits"

    def __init__(self, model: SmallCNN, batch_size: int = 512):
        self.model = model
        self.batch_size = batch_size
        self.feature_dim = model.config["feature_dim"]
        sd = model.state_dict()
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].detach().cpu().numpy().tobytes())
        self.id = f"digits-cnn-{h.hexdigest()[:12]}"
        self.description = f"digits recogniser (small CNN, {self.feature_dim}-d penultimate features)"

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        return classifier_predict(self.model, images, self.batch_size)


class InceptionFeatures:
    """FID Inception-v3 pool features (2048-d) and softmax over its 1008 logits."""

    kind = "inception"

    def __init__(self, weights=None, device="cpu", batch_size: int = 200):
        from .inception import load_fid_inception, resolve_inception_weights

        path = resolve_inception_weights(weights)
        self.model = load_fid_inception(path, device=device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.feature_dim = 2048
        st = path.stat()
        # "unbiased": the IS logits leave out fc's bias (features cached before that change are not reused)
        self.id = f"inception-{path.name}-{st.st_size}-unbiased"
        self.description = f"FID Inception-v3 ({path.name}, 2048-d pool features)"

    @torch.no_grad()
    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
        feats, probs = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = torch.from_numpy(images[start:start + self.batch_size]).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            pool, logits = self.model(x)
            feats.append(pool.float().cpu())
            probs.append(torch.softmax(logits.double(), dim=1).cpu())
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def images_digest(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((images.dtype.str, images.shape)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:20]


def cache_path(extractor, images, cache_dir) -> Path:
    """The feature cache file of ``images`` under ``extractor`` (keyed by the extractor id and the image bytes)."""
    return Path(cache_dir).expanduser() / f"features_{extractor.id}_{images_digest(np.asarray(images))}.npz"


def read_cached(path, num_images: int):
    """(features, probs) from a cache file, or None when it is absent, unreadable or of another size."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            feats, probs = data["features"], data["probs"]
        if feats.shape[0] == probs.shape[0] == num_images:
            return feats, probs
    except Exception as exc:  # torn or foreign file: recompute
        warnings.warn(f"ignoring unreadable feature cache {path}: {exc}", stacklevel=2)
    return None


def write_cached(path, feats, probs) -> None:
    """Write a cache file atomically; an unwritable folder only costs a warning."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, features=feats, probs=probs)
    try:
        atomic_write(path, lambda f: f.write(buf.getvalue()), durable=False)
    except OSError as exc:
        warnings.warn(f"could not cache features in {path.parent}: {exc}", stacklevel=2)


def extract(extractor, images, cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, probs) of ``images``; read from / written to ``cache_dir`` when given."""
    images = np.asarray(images)
    if cache_dir is None:
        return extractor(images)
    path = cache_path(extractor, images, cache_dir)
    cached = read_cached(path, images.shape[0])
    if cached is not None:
        return cached
    feats, probs = extractor(images)
    write_cached(path, feats, probs)
    return feats, probs
