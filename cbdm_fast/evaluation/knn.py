"""Exact k-nearest-neighbour radii and ball-membership tests, computed in chunks.

Memory stays O(chunk x N) (never an N x N matrix) and the work runs on whatever device the
features are on. Distances use the expansion ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2 (one matmul per
chunk), clamped at 0, with three guards against its cancellation error:
  * both sides are first centred on the reference set's mean (distances are translation invariant,
    and the norms, hence the cancellation error, shrink);
  * half-precision inputs are widened to float32, and float32 matmuls run at full precision
    (TF32 is switched off for the duration, whatever the caller set);
  * comparisons are made between squared distances and squared radii, both from the same formula.

    as_features(x, name)                        -> (N, D) floating torch tensor (numpy accepted)
    pairwise_sq_dists(a, b)                     -> (Na, Nb) squared Euclidean distances (small inputs)
    kth_nn_sq_radii(feats, k, chunk=None)       -> (N,) squared distance to the k-th nearest OTHER sample
    kth_nn_radii(feats, k, chunk=None)          -> (N,) the same, not squared
    within_any_ball(queries, centers, sq_radii, chunk=None)
                                                -> (Nq,) bool: query inside at least one ball (d^2 <= r^2)
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["as_features", "pairwise_sq_dists", "kth_nn_sq_radii", "kth_nn_radii", "within_any_ball",
           "auto_chunk"]

# Default working-set budget for one chunk of distances: 2^26 elements (256 MiB in float32).
CHUNK_ELEMENTS = 1 << 26


def as_features(x, name: str = "features", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (N, D) floating tensor from a torch tensor or numpy array (no copy when none is needed).

    Integers are converted to float64; half precision is widened to float32 (distances and sums in fp16
    or bf16 lose too much). ``dtype`` forces a dtype. Raises ValueError/TypeError naming ``name``.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if dtype is not None:
        x = x.to(dtype)
    elif not x.is_floating_point():
        x = x.double()
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _common(a: torch.Tensor, b: torch.Tensor):
    """Both on a's device, in the wider of the two dtypes."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


@contextlib.contextmanager
def full_precision_matmul():
    """Switch TF32 off for float32 matmuls while the block runs (restored afterwards)."""
    prec = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


def auto_chunk(n_cols: int, chunk: int | None) -> int:
    """Rows per chunk: ``chunk`` if given (validated), else as many as fit CHUNK_ELEMENTS."""
    if chunk is None:
        return max(1, CHUNK_ELEMENTS // max(1, n_cols))
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    return int(chunk)


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 from precomputed squared norms, clamped at 0."""
    d = torch.addmm(b_sq.unsqueeze(0), a, b.t(), beta=1.0, alpha=-2.0)
    d.add_(a_sq.unsqueeze(1))
    return d.clamp_min_(0.0)


def pairwise_sq_dists(a, b) -> torch.Tensor:
    """The dense (Na, Nb) matrix of squared distances (for small inputs; uses the same formula)."""
    a, b = _common(as_features(a, "a"), as_features(b, "b"))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    center = b.mean(0)
    a, b = a - center, b - center
    with full_precision_matmul():
        return _sq_dists(a, a.square().sum(1), b, b.square().sum(1))


def kth_nn_sq_radii(feats, k: int, chunk: int | None = None) -> torch.Tensor:
    """Squared distance from each sample to its k-th nearest neighbour among the OTHER samples.

    The sample itself is excluded (its own entry is set to +inf), so an exact duplicate elsewhere in
    the set counts as a neighbour at distance 0. Needs k < N.
    """
    x = as_features(feats, "feats")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, N-1] = [1, {n - 1}], got {k!r}")
    rows = auto_chunk(n, chunk)
    x = x - x.mean(0)
    x_sq = x.square().sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    with full_precision_matmul():
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            d = _sq_dists(x[start:stop], x_sq[start:stop], x, x_sq)
            idx = torch.arange(stop - start, device=x.device)
            d[idx, idx + start] = float("inf")  # exclude the sample itself
            out[start:stop] = torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, -1]
    return out


def kth_nn_radii(feats, k: int, chunk: int | None = None) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample (sqrt of kth_nn_sq_radii)."""
    return kth_nn_sq_radii(feats, k, chunk).sqrt()


def within_any_ball(queries, centers, sq_radii, chunk: int | None = None) -> torch.Tensor:
    """For each query: is ||q - c_i||^2 <= sq_radii[i] for at least one center i? -> (Nq,) bool.

    Chunks over the queries (rows) so memory stays O(chunk x Ncenters); runs on the centers' device.
    """
    c = as_features(centers, "centers")
    q = as_features(queries, "queries")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries and centers must have the same feature dimension, "
                         f"got {q.shape[1]} and {c.shape[1]}")
    c, q = _common(c, q)
    r = torch.as_tensor(sq_radii).to(device=c.device, dtype=c.dtype)
    if r.shape != (c.shape[0],):
        raise ValueError(f"sq_radii must have shape ({c.shape[0]},) (one per center), got {tuple(r.shape)}")
    center = c.mean(0)
    c, q = c - center, q - center
    c_sq, q_sq = c.square().sum(1), q.square().sum(1)
    rows = auto_chunk(c.shape[0], chunk)
    out = torch.empty(q.shape[0], dtype=torch.bool, device=c.device)
    with full_precision_matmul():
        for start in range(0, q.shape[0], rows):
            stop = min(start + rows, q.shape[0])
            d = _sq_dists(q[start:stop], q_sq[start:stop], c, c_sq)
            out[start:stop] = (d <= r.unsqueeze(0)).any(dim=1)
    return out
