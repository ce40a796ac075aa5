"""Kernel Inception Distance (Binkowski et al., ICLR 2018).

Unbiased estimate of the squared MMD with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
averaged over random subsets: for subsets X, Y of m samples each (drawn without replacement),
    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2
Computed in float64 on the features' device; subsets are drawn from a seeded CPU generator, so the
result does not depend on the global RNG or the device.
"""
from __future__ import annotations

import numpy as np
import torch

from .knn import as_features

__all__ = ["kid", "mmd2_unbiased", "polynomial_kernel"]


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / D + 1)^3 for all pairs of rows."""
    return (x @ y.t() / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between two equally sized sets with the cubic polynomial kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"mmd2_unbiased needs two sets of the same size >= 2, got {m} and {y.shape[0]}")
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    value = (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)
    return float(value)


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over ``subsets`` random subsets of ``subset_size`` samples.

    subset_size is capped at the smaller set's size. The std is the population std over subsets
    (numpy's default ddof=0, as in the reference implementations); it measures the spread of the
    subset estimates, not the standard error of the mean.
    """
    a = as_features(feats_a, "feats_a", dtype=torch.float64)
    b = as_features(feats_b, "feats_b", dtype=torch.float64).to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, "
                         f"got {a.shape[1]} and {b.shape[1]}")
    if isinstance(subsets, bool) or not isinstance(subsets, (int, np.integer)) or subsets < 1:
        raise ValueError(f"subsets must be a positive integer, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"both feature sets need at least 2 samples, got {a.shape[0]} and {b.shape[0]}")
    gen = torch.Generator().manual_seed(int(seed))
    values = np.empty(int(subsets), dtype=np.float64)
    for i in range(int(subsets)):
        ia = torch.randperm(a.shape[0], generator=gen)[:m].to(a.device)
        ib = torch.randperm(b.shape[0], generator=gen)[:m].to(a.device)
        values[i] = mmd2_unbiased(a[ia], b[ib])
    return float(values.mean()), float(values.std())
