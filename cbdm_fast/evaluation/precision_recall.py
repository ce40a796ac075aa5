"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019), k-NN manifold estimates.

The real manifold is the union of balls around every real feature vector, each ball's radius being
the distance to that sample's k-th nearest real neighbour (itself excluded). Likewise for the fake set.
    precision = fraction of fake samples inside the real manifold   (fidelity)
    recall    = fraction of real samples inside the fake manifold   (diversity / coverage)
Everything runs in chunks on the features' device (see knn.py): memory O(chunk x N), never the dense
N x N float64 matrices of the authors' code.
"""
from __future__ import annotations

from .knn import as_features, kth_nn_sq_radii, within_any_ball

__all__ = ["improved_precision_recall", "manifold_coverage"]


def manifold_coverage(support, queries, k: int = 5, chunk: int | None = None) -> float:
    """Fraction of ``queries`` inside the k-NN manifold of ``support`` (the one-sided half of P/R)."""
    s = as_features(support, "support")
    q = as_features(queries, "queries")
    if s.shape[1] != q.shape[1]:
        raise ValueError(f"support and queries must have the same feature dimension, "
                         f"got {s.shape[1]} and {q.shape[1]}")
    sq_radii = kth_nn_sq_radii(s, k, chunk)
    return float(within_any_ball(q, s, sq_radii, chunk).double().mean())


def improved_precision_recall(real, fake, k: int = 5, chunk: int | None = None) -> tuple[float, float]:
    """(precision, recall) of ``fake`` against ``real``, both (N, D) feature arrays or tensors.

    k: neighbourhood size (the CBDM evaluation uses 5, the paper 3); needs k < N for both sets.
    chunk: rows per distance block (None: as many as fit a 2^26-element block).
    """
    real = as_features(real, "real")
    fake = as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same feature dimension, "
                         f"got {real.shape[1]} and {fake.shape[1]}")
    fake = fake.to(real.device)
    precision = manifold_coverage(real, fake, k, chunk)
    recall = manifold_coverage(fake, real, k, chunk)
    return precision, recall
