"""The feature step of python -m cbdm_fast.evaluate, sharded over torchrun ranks (see sharding.py).

    share_recogniser(model, shards) -> the digits recogniser on every rank (built, and trained or
        loaded from the cache, by rank 0 alone; its weights broadcast), so the ranks extract with
        identical weights and only rank 0 writes the recogniser cache
    gather_features(shards, extractor, recogniser, images, ref_images, cache_dir, log)
        -> Features on rank 0, None on the others

Features are computed per image, so the concatenated slices equal the single-process features up to
float rounding (the batch composition differs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .features import cache_path, read_cached, write_cached
from .sharding import Shards, concat_parts


@dataclass
class Features:
    real_feats: np.ndarray
    fake_feats: np.ndarray
    fake_probs: np.ndarray
    recog_probs: np.ndarray | None   # the data set's recogniser on the generated images (None: none)


def share_recogniser(model, shards: Shards):
    """Rank 0's SmallCNN on every rank (``model`` is None on the other ranks)."""
    if not shards.enabled:
        return model
    from .digits_classifier import SmallCNN

    blob = shards.broadcast({"config": model.config, "state_dict": model.state_dict()} if shards.is_main else None)
    if shards.is_main:
        return model
    copy = SmallCNN(**blob["config"])
    copy.load_state_dict(blob["state_dict"])
    return copy.eval()


def extract_slice(extractor, images):
    """(features, probs) of a slice; None for an empty slice (more ranks than images)."""
    return extractor(images) if len(images) else None


def gather_features(shards: Shards, extractor, recogniser, images, ref_images, cache_dir, log) -> Features | None:
    """Every rank extracts its slice of the generated (and, unless cached, real) images; rank 0 gets all.

    The reference cache is read and written by rank 0 only; whether it hit is broadcast so that every
    rank knows whether to extract its slice of the real images.
    """
    ref_path = cache_path(extractor, ref_images, cache_dir) if cache_dir is not None and shards.is_main else None
    cached = read_cached(ref_path, len(ref_images)) if ref_path is not None else None
    need_real = not shards.broadcast(cached is not None)
    separate_recogniser = recogniser is not None and recogniser is not extractor
    part_fake, part_real = shards.part(len(images)), shards.part(len(ref_images))

    def mine() -> dict:
        out = {}
        if need_real:
            log(f"features of {len(ref_images)} real reference images ({extractor.description})...")
            out["real"] = extract_slice(extractor, ref_images[part_real])
        log(f"features of {len(images)} generated images...")
        out["fake"] = extract_slice(extractor, images[part_fake])
        if separate_recogniser:
            out["recog"] = extract_slice(recogniser, images[part_fake])
        return out

    parts = shards.gather(shards.checked(mine))  # the one gather of the run
    if not shards.is_main:
        return None
    if need_real:
        real = concat_parts(parts, "real")
        if ref_path is not None:
            write_cached(ref_path, *real)
    else:
        log(f"features of {len(ref_images)} real reference images: read from the cache")
        real = cached
    fake_feats, fake_probs = concat_parts(parts, "fake")
    recog_probs = concat_parts(parts, "recog")[1] if separate_recogniser else (
        fake_probs if recogniser is not None else None)
    return Features(real[0], fake_feats, fake_probs, recog_probs)
