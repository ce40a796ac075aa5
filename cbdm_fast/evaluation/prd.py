"""Precision and recall for distributions, PRD (Sajjadi et al., NeurIPS 2018).

Algorithm (per run, averaged over ``num_runs`` runs with different k-means seeds):
 1. Cluster the union of real and fake features into ``num_clusters`` clusters (k-means; the CBDM
    evaluation uses 20 x num_classes).
 2. P = histogram of the real samples over the clusters, Q = histogram of the fake samples (normalised).
 3. For lambda = tan(angle), angle in linspace(eps, pi/2 - eps, num_angles):
        precision alpha(lambda) = sum_w min(lambda P(w), Q(w))
        recall    beta(lambda)  = alpha(lambda) / lambda  = sum_w min(P(w), Q(w) / lambda)
Summaries: F_beta(p, r) = (1 + beta^2) p r / (beta^2 p + r), maximised along the curve.
    F_8   (beta = 8)   weights RECALL    (how much of the real distribution the model covers)
    F_1/8 (beta = 1/8) weights PRECISION (how much of the model's mass lies on the real distribution)
The CBDM authors' evaluation prints these two the other way round; here they are named by what they
measure: a model that covers half the real clusters well has a high f_1_8 and a low f_8.
"""
from __future__ import annotations

import numpy as np
import torch

from .knn import as_features

__all__ = ["prd", "prd_curve", "max_f_beta"]

_ANGLE_EPS = 1e-10


def prd_curve(real_dist, fake_dist, num_angles: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) curves of fake against real from two histograms over the same bins."""
    p = np.asarray(real_dist, dtype=np.float64)
    q = np.asarray(fake_dist, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(f"real_dist and fake_dist must be vectors of the same length, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or not np.isclose(p.sum(), 1) or not np.isclose(q.sum(), 1):
        raise ValueError("real_dist and fake_dist must be probability vectors (non-negative, summing to 1)")
    if isinstance(num_angles, bool) or not isinstance(num_angles, (int, np.integer)) or num_angles < 3:
        raise ValueError(f"num_angles must be an integer >= 3, got {num_angles!r}")
    slopes = np.tan(np.linspace(_ANGLE_EPS, np.pi / 2 - _ANGLE_EPS, int(num_angles)))
    precision = np.minimum(slopes[:, None] * p[None, :], q[None, :]).sum(1)
    recall = precision / slopes
    # sums of probabilities can exceed 1 by a rounding error
    return np.clip(precision, 0.0, 1.0), np.clip(recall, 0.0, 1.0)


def max_f_beta(precision, recall, beta: float) -> float:
    """max over the curve of F_beta = (1 + beta^2) p r / (beta^2 p + r) (0 where p = r = 0)."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    b2 = float(beta) ** 2
    denom = b2 * p + r
    f = np.where(denom > 0, (1 + b2) * p * r / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f.max())


def prd(real, fake, num_clusters: int, num_angles: int = 1001, num_runs: int = 10, seed: int = 0,
        n_init: int = 3, batch_size: int = 1024) -> dict:
    """PRD curves and scores of ``fake`` against ``real`` (both (N, D) features).

    Returns dict(precision=(num_angles,) array, recall=(num_angles,) array, f_8=float (recall-like),
    f_1_8=float (precision-like)). k-means is scikit-learn's MiniBatchKMeans with random_state
    seed + run and ``n_init`` initialisations, so results are deterministic for a given seed.
    Sets of very different sizes bias the clustering toward the larger one; equal sizes are advised.
    """
    from sklearn.cluster import MiniBatchKMeans  # heavy import, only needed here

    real_t = as_features(real, "real")
    fake_t = as_features(fake, "fake")
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"real and fake must have the same feature dimension, "
                         f"got {real_t.shape[1]} and {fake_t.shape[1]}")
    n_real, n_fake = real_t.shape[0], fake_t.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) \
            or not 1 <= num_clusters <= n_real + n_fake:
        raise ValueError(f"num_clusters must be an integer in [1, {n_real + n_fake}] "
                         f"(at most the number of samples), got {num_clusters!r}")
    if isinstance(num_runs, bool) or not isinstance(num_runs, (int, np.integer)) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive integer, got {num_runs!r}")
    dtype = np.float64 if real_t.dtype == fake_t.dtype == torch.float64 else np.float32
    data = np.concatenate([real_t.cpu().numpy().astype(dtype, copy=False),
                           fake_t.cpu().numpy().astype(dtype, copy=False)])
    precisions, recalls = [], []
    for run in range(int(num_runs)):
        kmeans = MiniBatchKMeans(n_clusters=int(num_clusters), n_init=n_init, batch_size=batch_size,
                                 random_state=int(seed) + run)
        labels = kmeans.fit_predict(data)
        p = np.bincount(labels[:n_real], minlength=num_clusters) / n_real
        q = np.bincount(labels[n_real:], minlength=num_clusters) / n_fake
        prec, rec = prd_curve(p, q, num_angles)
        precisions.append(prec)
        recalls.append(rec)
    precision = np.mean(precisions, axis=0)
    recall = np.mean(recalls, axis=0)
    return dict(precision=precision, recall=recall,
                f_8=max_f_beta(precision, recall, 8.0), f_1_8=max_f_beta(precision, recall, 1.0 / 8.0))
