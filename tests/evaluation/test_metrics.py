"""Metric math of cbdm_fast.evaluation: FID, KID, IS, improved precision/recall, PRD, long-tail groups.

Each metric is checked against a closed form or a direct (dense, O(n^2)) computation on small inputs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cbdm_fast.evaluation import (class_counts, feature_stats, fid, fid_from_stats, group_average, group_classes,
                                  grouped_fid, improved_precision_recall, inception_score, kid, load_stats,
                                  per_class_fid, per_class_precision_recall, prd, save_stats)
from cbdm_fast.evaluation.fid import trace_sqrt_product
from cbdm_fast.evaluation.kid import polynomial_kernel
from cbdm_fast.evaluation.knn import kth_nn_radii, kth_nn_sq_radii, pairwise_sq_dists, within_any_ball
from cbdm_fast.evaluation.prd import max_f_beta, prd_curve

pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed=0):
    return np.random.default_rng(seed)


def random_cov(d, rank=None, seed=0):
    a = rng(seed).standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ------------------------------------------------------------------------------------------------ FID

def test_fid_of_a_set_with_itself_is_zero():
    x = rng(1).standard_normal((1000, 64)) @ rng(2).standard_normal((64, 64))
    mu, sigma = feature_stats(x)
    assert fid(x, x) < 1e-6 * np.trace(sigma)
    assert fid(torch.from_numpy(x).float(), x.astype(np.float32)) < 1e-6 * np.trace(sigma)


def test_fid_with_itself_is_zero_for_singular_covariances():
    # fewer samples than dimensions (per-class FID on tail classes): rank-deficient covariance,
    # where sqrtm of S1 S2 is ill-conditioned
    for rank in (1, 5, 30):
        sigma = random_cov(64, rank, seed=rank)
        mu = rng(rank).standard_normal(64)
        assert fid_from_stats(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma), rank
        # unclamped: Tr((S S)^{1/2}) = Tr(S) (rounding noise below D eps max(eig) is dropped)
        assert trace_sqrt_product(sigma, sigma) == pytest.approx(np.trace(sigma), rel=1e-12), rank


def test_trace_sqrt_product_is_exact_for_low_rank_covariances():
    # S1 = A A^T, S2 = B B^T: Tr((S1 S2)^{1/2}) = nuclear norm of A^T B (sqrtm of S1 S2 is off by ~1e-6 here)
    g = rng(20)
    for d, r in ((64, 1), (256, 5), (256, 40)):
        a, b = g.standard_normal((d, r)), g.standard_normal((d, r))
        expected = np.linalg.svd(a.T @ b, compute_uv=False).sum()
        assert trace_sqrt_product(a @ a.T, b @ b.T) == pytest.approx(expected, rel=1e-10), (d, r)


def test_fid_matches_the_closed_form_for_diagonal_covariances():
    g = rng(3)
    d = 50
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    s1, s2 = g.uniform(0.1, 3, d), g.uniform(0.1, 3, d)
    s2[:5] = 0.0  # singular
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    # torch inputs give the same value
    got_t = fid_from_stats(*(torch.from_numpy(a) for a in (mu1, np.diag(s1), mu2, np.diag(s2))))
    assert got_t == pytest.approx(expected, rel=1e-10)


def test_trace_sqrt_product_matches_sqrtm_on_full_rank_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_cov(40, seed=4), random_cov(40, seed=5)
    expected = np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)
    assert trace_sqrt_product(s2, s1) == pytest.approx(expected, rel=1e-9)


def test_fid_from_large_samples_approaches_the_closed_form():
    g = rng(6)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 2.0, 1.5, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    a = mu1 + np.sqrt(s1) * g.standard_normal((n, d))
    b = mu2 + np.sqrt(s2) * g.standard_normal((n, d))
    assert fid(a, b) == pytest.approx(expected, rel=0.02, abs=5e-3)


def test_feature_stats_match_numpy_for_any_chunk():
    x = rng(7).standard_normal((301, 9)) * 3 + 100.0  # a large offset: the two-pass covariance keeps precision
    for chunk in (1, 64, 300, 301, 10_000):
        mu, sigma = feature_stats(x, chunk=chunk)
        assert mu.dtype == sigma.dtype == np.float64
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="features"):
        feature_stats(x[0])


def test_stats_round_trip_with_keys_mu_and_sigma(tmp_path):
    mu, sigma = feature_stats(rng(8).standard_normal((50, 6)).astype(np.float32))
    path = save_stats(tmp_path / "stats.npz", mu, sigma)
    with np.load(path) as data:  # the widely used layout: exactly mu and sigma, float64
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].dtype == data["sigma"].dtype == np.float64
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # files written by other tools (plain np.savez, float32) load too
    np.savez(tmp_path / "other.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, _ = load_stats(tmp_path / "other.npz")
    assert mu3.dtype == np.float64
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="sigma"):
        load_stats(tmp_path / "bad.npz")


def test_fid_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="sigma1"):
        fid_from_stats(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------ KID

def direct_mmd2_unbiased(x, y):
    """The unbiased MMD^2 written out as double sums over pairs."""
    m, d = x.shape
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_direct_unbiased_mmd_with_one_full_subset():
    g = rng(9)
    x, y = g.standard_normal((30, 5)), g.standard_normal((30, 5)) + 0.3
    mean, std = kid(x, y, subsets=1, subset_size=30)
    assert mean == pytest.approx(direct_mmd2_unbiased(x, y), rel=1e-10)
    assert std == 0.0
    # subset_size is capped at the smaller set: with 30 real samples, 1000 asked means 30
    assert kid(x, y, subsets=1, subset_size=1000)[0] == pytest.approx(mean, rel=1e-10)
    np.testing.assert_allclose(polynomial_kernel(torch.from_numpy(x), torch.from_numpy(y)).numpy(),
                               (x @ y.T / 5 + 1) ** 3, rtol=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    g = rng(10)
    a, b = g.standard_normal((2000, 16)), g.standard_normal((2000, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=500)
    shifted_mean, _ = kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.3
    assert shifted_mean > 50 * max(abs(same_mean), same_std)


def test_kid_is_deterministic_and_seeded():
    g = rng(11)
    a, b = g.standard_normal((200, 8)), g.standard_normal((150, 8))
    r1 = kid(a, b, subsets=5, subset_size=50, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    r2 = kid(torch.from_numpy(a).float(), torch.from_numpy(b), subsets=5, subset_size=50, seed=3)
    assert r1[0] == pytest.approx(r2[0], rel=1e-6)
    assert kid(a, b, subsets=5, subset_size=50, seed=4) != r1
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=1)


# ------------------------------------------------------------------------------------------------- IS

def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.full((100, 10), 0.1))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_num_classes():
    c, splits = 7, 10
    labels = np.arange(c * splits * 3) % c  # every split holds each class equally often
    probs = np.eye(c)[labels]
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(c, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(torch.from_numpy(probs).float(), splits=1)[0] == pytest.approx(c, rel=1e-6)


def test_inception_score_uses_contiguous_splits():
    probs = np.eye(2)[np.repeat([0, 1], 50)]  # first half class 0, second half class 1
    assert inception_score(probs, splits=1)[0] == pytest.approx(2.0)
    mean, std = inception_score(probs, splits=2)  # each split is confident on one class only
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    # N not divisible by splits: every sample used, part sizes differ by at most one
    labels = np.arange(103) % 4
    mean, _ = inception_score(np.eye(4)[labels], splits=10)
    assert 3.0 < mean <= 4.0
    with pytest.raises(ValueError, match="splits"):
        inception_score(probs, splits=101)
    with pytest.raises(ValueError, match="probs"):
        inception_score(np.log(probs + 1e-3))


# ------------------------------------------------------------------------------ k-NN and precision/recall

def dense_sq_radii(x, k):
    d = torch.cdist(x, x).square()
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def dense_within(q, c, sq_radii):
    return (torch.cdist(q, c).square() <= sq_radii[None, :]).any(1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 202, 203, 1000, None])
def test_chunked_knn_equals_a_dense_cdist_reference(chunk):
    g = torch.Generator().manual_seed(12)
    real = torch.randn(203, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(157, 8, generator=g, dtype=torch.float64) * 1.2 + 0.3
    for k in (1, 3, 5):
        ref = dense_sq_radii(real, k)
        got = kth_nn_sq_radii(real, k, chunk=chunk)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kth_nn_radii(real, k, chunk=chunk), ref.sqrt(), rtol=1e-10, atol=1e-12)
        assert torch.equal(within_any_ball(fake, real, got, chunk=chunk), dense_within(fake, real, ref))
    # the full metric agrees with the dense one
    k = 5
    p_ref = dense_within(fake, real, dense_sq_radii(real, k)).double().mean().item()
    r_ref = dense_within(real, fake, dense_sq_radii(fake, k)).double().mean().item()
    assert improved_precision_recall(real, fake, k=k, chunk=chunk) == (pytest.approx(p_ref), pytest.approx(r_ref))


def test_pairwise_sq_dists_matches_cdist_in_float32():
    g = torch.Generator().manual_seed(13)
    a, b = torch.rand(50, 2048, generator=g) + 5.0, torch.rand(40, 2048, generator=g) + 5.0
    ref = torch.cdist(a.double(), b.double()).square()
    torch.testing.assert_close(pairwise_sq_dists(a, b).double(), ref, rtol=1e-4, atol=1e-2)


def test_knn_radii_exclude_the_sample_itself_but_not_duplicates():
    x = torch.randn(20, 3, dtype=torch.float64)
    # a duplicate is a neighbour at distance 0, up to the rounding of ||a||^2 - 2ab + ||b||^2
    scale = x.square().sum(1).max().item()
    assert kth_nn_sq_radii(torch.cat([x, x]), 1).max().item() <= 1e-13 * scale
    assert bool((kth_nn_sq_radii(x, 1) > 0).all())
    with pytest.raises(ValueError, match="k"):
        kth_nn_sq_radii(x, 20)


def test_precision_recall_of_identical_sets_is_one():
    x = torch.randn(500, 16)
    assert improved_precision_recall(x, x.clone(), k=5) == (1.0, 1.0)
    assert improved_precision_recall(x.numpy(), x.numpy(), k=3, chunk=33) == (1.0, 1.0)


def test_precision_recall_of_a_small_cluster_inside_the_real_support():
    g = torch.Generator().manual_seed(14)
    real = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    fake = 0.1 * torch.randn(500, 2, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.0], dtype=torch.float64)
    precision, recall = improved_precision_recall(real, fake, k=5)
    assert precision > 0.98
    assert recall < 0.15


def test_precision_recall_of_disjoint_sets_is_zero():
    real = torch.randn(400, 8)
    fake = torch.randn(300, 8) + 100.0
    assert improved_precision_recall(real, fake, k=5) == (0.0, 0.0)


@pytest.mark.gpu
def test_precision_recall_on_cuda_matches_cpu():
    real, fake = torch.randn(3000, 64), torch.randn(2500, 64) * 1.1 + 0.05
    cpu = improved_precision_recall(real.double(), fake.double(), k=5, chunk=999)
    gpu = improved_precision_recall(real.cuda().double(), fake.cuda().double(), k=5, chunk=999)
    assert gpu == (pytest.approx(cpu[0]), pytest.approx(cpu[1]))


# ------------------------------------------------------------------------------------------------ PRD

def mixture(n, modes, centers, seed):
    g = rng(seed)
    which = g.choice(modes, size=n)
    return centers[which] + 0.3 * g.standard_normal((n, centers.shape[1]))


def test_prd_curve_of_known_histograms():
    p = np.full(10, 0.1)
    q = np.r_[np.full(5, 0.2), np.zeros(5)]  # the model puts all its mass on half the real bins
    precision, recall = prd_curve(p, q, num_angles=2001)
    assert precision.max() == pytest.approx(1.0) and recall.max() == pytest.approx(0.5)
    assert max_f_beta(precision, recall, 1 / 8) == pytest.approx(65 / 64 * 0.5 / (1 / 64 + 0.5), rel=1e-3)
    assert max_f_beta(precision, recall, 8) == pytest.approx(65 * 0.5 / 64.5, rel=1e-3)
    same_p, same_r = prd_curve(p, p)
    assert same_p.max() == pytest.approx(1.0) and same_r.max() == pytest.approx(1.0)


def test_prd_names_f8_recall_and_f1_8_precision():
    centers = 10.0 * rng(15).standard_normal((10, 8))
    real = mixture(2000, np.arange(10), centers, seed=16)
    same = mixture(2000, np.arange(10), centers, seed=17)
    half = mixture(2000, np.arange(5), centers, seed=18)  # covers only half the real modes
    r_same = prd(real, same, num_clusters=20, num_runs=3)
    assert r_same["f_8"] > 0.9 and r_same["f_1_8"] > 0.9
    assert r_same["precision"].shape == r_same["recall"].shape == (1001,)
    r_half = prd(real, half, num_clusters=20, num_runs=3)
    assert r_half["f_1_8"] > 0.9  # precision-like: everything the model makes is realistic
    assert r_half["f_8"] < 0.6  # recall-like: half the real distribution is missed
    again = prd(real, half, num_clusters=20, num_runs=3)  # deterministic with the seed
    assert again["f_8"] == r_half["f_8"] and np.array_equal(again["recall"], r_half["recall"])


# --------------------------------------------------------------------------------- long-tail groups

def test_group_classes_on_digits_lt_counts():
    counts = [140, 108, 83, 64, 50, 38, 30, 23, 18, 14]
    assert group_classes(counts) == {"many": [0, 1], "medium": [2, 3, 4, 5, 6, 7], "few": [8, 9]}
    assert group_classes(torch.tensor(counts)) == group_classes(np.array(counts))
    assert group_classes(counts, many=50, few=30) == {"many": [0, 1, 2, 3], "medium": [4, 5, 6],
                                                      "few": [7, 8, 9]}


def test_group_thresholds_are_strict_at_both_ends():
    groups = group_classes({3: 101, 5: 100, 7: 20, 9: 19})
    assert groups == {"many": [3], "medium": [5, 7], "few": [9]}
    with pytest.raises(ValueError, match="few"):
        group_classes([1, 2], many=10, few=20)


def test_class_counts_and_group_average():
    assert class_counts([0, 2, 2, 1, 2]) == [1, 1, 3]
    assert class_counts(torch.tensor([1, 1]), num_classes=4) == [0, 2, 0, 0]
    groups = {"many": [0, 1], "medium": [2], "few": [3, 4]}
    avg = group_average({0: 1.0, 1: 3.0, 2: 5.0, 3: math.nan}, groups)
    assert avg["many"] == 2.0 and avg["medium"] == 5.0 and math.isnan(avg["few"])
    assert avg["all"] == 3.0


def test_per_class_metrics():
    g = torch.Generator().manual_seed(19)
    d = 4
    real = torch.randn(600, d, generator=g, dtype=torch.float64)
    real_y = torch.arange(600) % 3
    fake = torch.randn(600, d, generator=g, dtype=torch.float64)
    fake_y = torch.arange(600) % 3
    fake[fake_y == 1] += 100.0  # class 1 generated far off the real data
    fake_y[0] = 5  # class 5: one fake sample, no real one -> not reported by default
    fids = per_class_fid(real, real_y, fake, fake_y)
    assert sorted(fids) == [0, 1, 2]
    for c in (0, 1, 2):
        assert fids[c] == pytest.approx(fid(real[real_y == c], fake[fake_y == c]))
    assert fids[0] < 1.0 and fids[1] > 1e4
    assert math.isnan(per_class_fid(real, real_y, fake, fake_y, classes=[5])[5])
    precision, recall = per_class_precision_recall(real, real_y, fake, fake_y, k=3)
    assert precision[1] == recall[1] == 0.0
    assert precision[0] > 0.8 and recall[2] > 0.8
    pooled = grouped_fid(real, real_y, fake, fake_y, {"many": [0, 2], "few": [1]})
    keep = torch.isin(fake_y, torch.tensor([0, 2]))
    assert pooled["many"] == pytest.approx(fid(real[real_y != 1], fake[keep]))
    with pytest.raises(ValueError, match="real_labels"):
        per_class_fid(real, real_y[:10], fake, fake_y)
