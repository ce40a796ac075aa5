"""Inception Score (Salimans et al., 2016) from class probabilities.

    IS = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = E_x p(y|x) over the same split,
computed on ``splits`` contiguous parts of the samples (part i = rows [i N / splits, (i+1) N / splits),
every sample used, part sizes differing by at most one), reported as the mean and population std of
the per-part scores, as in the original implementation. float64; 0 log 0 = 0.
"""
from __future__ import annotations

import numpy as np
import torch

from .knn import as_features

__all__ = ["inception_score"]


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score of (N, C) softmax probabilities over ``splits`` parts."""
    p = as_features(probs, "probs", dtype=torch.float64)
    n = p.shape[0]
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or not 1 <= splits <= n:
        raise ValueError(f"splits must be an integer in [1, N] = [1, {n}], got {splits!r}")
    if bool((p < 0).any()):
        raise ValueError("probs must be non-negative (softmax probabilities, not logits)")
    row_sums = p.sum(1)
    if not bool(torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3, rtol=0.0)):
        worst = float((row_sums - 1).abs().max())
        raise ValueError(f"each row of probs must sum to 1 (softmax probabilities); worst |sum - 1| = {worst:.3g}")
    p = p / row_sums.unsqueeze(1)  # remove the float32 softmax's rounding
    scores = []
    for i in range(int(splits)):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, py)).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())
