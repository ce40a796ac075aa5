"""Frechet Inception Distance (Heusel et al., 2017) from feature statistics.

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

Numerics. The trace of the matrix square root is taken from eigenvalues, not from scipy.linalg.sqrtm
of the non-symmetric product S1 S2: with R = S1^{1/2} (symmetric eigendecomposition, negative rounding
eigenvalues clamped to 0), S1 S2 = R (R S2) has the same eigenvalues as R S2 R, which is symmetric
positive semi-definite, so
    Tr((S1 S2)^{1/2}) = sum_i sqrt(max(lambda_i(R S2 R), 0)).
Two symmetric eigendecompositions in float64: no complex round-off to discard, and exact for singular
covariances (fewer samples than dimensions, e.g. per-class FID on tail classes), where sqrtm is
ill-conditioned and the usual fix (adding 1e-6 I to both covariances) changes the value.

Statistics files are .npz archives with float64 arrays ``mu`` (D,) and ``sigma`` (D, D), the format of
the widely used reference-statistics files (pytorch-fid, TTUR, the CBDM authors' cifar stats).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from ..files.arrays import open_npz
from ..files.atomic import atomic_write
from .knn import as_features

__all__ = ["feature_stats", "fid_from_stats", "fid", "save_stats", "load_stats", "trace_sqrt_product"]

_STATS_CHUNK = 8192  # rows per block when accumulating the covariance


def feature_stats(features, chunk: int = _STATS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features: float64 mean and unbiased covariance (ddof=1, like numpy.cov).

    Two passes in float64 on the features' device, accumulated in row blocks (no float64 copy of
    all features): the mean first, then sum (x - mu)^T (x - mu), which avoids the cancellation of
    the one-pass E[x x^T] - mu mu^T. Needs N >= 2.
    """
    x = as_features(features, "features")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"features needs at least 2 samples for a covariance, got {n}")
    mu = torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        mu += x[s:s + chunk].double().sum(0)
    mu /= n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        xc = x[s:s + chunk].double() - mu
        cov.addmm_(xc.t(), xc)
    cov /= n - 1
    cov = 0.5 * (cov + cov.t())
    return mu.cpu().numpy(), cov.cpu().numpy()


def _stats_arrays(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mu, torch.Tensor):
        mu = mu.detach().cpu().numpy()
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().cpu().numpy()
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{name} must have shape ({mu.shape[0]}, {mu.shape[0]}) to match mu{name}, "
                         f"got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name} / sigma{name} contain NaN or infinite values")
    return mu, sigma


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise removed.

    Eigenvalues below D * eps * max|w| are indistinguishable from rounding (eigh's backward error) and
    are set to 0, as numpy's pinv does with rcond: otherwise the square roots of ~1e-16 noise add up
    to ~1e-7 of the trace for rank-deficient covariances. Zeroing a genuine eigenvalue that small
    changes the trace of the root by no more than that noise would.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def _sym_psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, via the eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    r = _sym_psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(_psd_eigenvalues(w)).sum())


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy or torch inputs; float64).

    Rounding can leave a result of order -1e-12 * trace for identical statistics; it is clamped to 0.
    """
    mu1, sigma1 = _stats_arrays(mu1, sigma1, "1")
    mu2, sigma2 = _stats_arrays(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def fid(feats_a, feats_b) -> float:
    """FID between two (N, D) feature sets (statistics via feature_stats)."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, "
                         f"got {mu1.shape[0]} and {mu2.shape[0]}")
    return fid_from_stats(mu1, s1, mu2, s2)


def save_stats(path, mu, sigma):
    """Write ``mu`` and ``sigma`` (float64) to an .npz file at exactly ``path``, atomically."""
    mu, sigma = _stats_arrays(mu, sigma, "")

    def write(f):
        buf = io.BytesIO()
        np.savez(buf, mu=mu, sigma=sigma)
        f.write(buf.getvalue())

    return atomic_write(path, write, durable=False)


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from an .npz file holding the keys ``mu`` and ``sigma`` (ValueError saying
    what the file is otherwise)."""
    with open_npz(path) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: statistics file lacks key(s) {missing}; found {data.files}")
        return _stats_arrays(data["mu"], data["sigma"], "")
