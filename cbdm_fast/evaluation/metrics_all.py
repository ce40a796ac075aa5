"""Every metric of the evaluation protocol from features: one call, one JSON-ready dict.

    compute_metrics(real_feats, real_labels, fake_feats, fake_labels, fake_probs, train_counts, ...)
returns
    overall:   fid, kid {mean, std, subset_size}, inception_score {mean, std, splits}, precision, recall (k),
               prd {f_8 (recall-like), f_1_8 (precision-like), num_clusters, num_runs},
               recognition_accuracy (fraction of samples the recogniser assigns their own label)
    per_class: list of {class, train_count, group, num_samples, num_real, fid, precision, recall, accuracy}
    groups:    {many|medium|few|all: {classes, fid_mean, fid_pooled, precision, recall, accuracy}}
    notes:     human-readable reasons for every null (too few samples, no labels, ...)
Metrics that cannot be computed are None (null in JSON), never NaN, and the reason goes to notes.
The Inception Score splits a seeded permutation of the samples (files written class by class would
otherwise put one class in each split).
"""
from __future__ import annotations

import math

import numpy as np

from .fid import feature_stats, fid_from_stats
from .groups import GROUPS, group_average, group_classes, grouped_fid, per_class_fid, per_class_precision_recall
from .inception_score import inception_score
from .kid import kid
from .prd import prd
from .precision_recall import improved_precision_recall

__all__ = ["compute_metrics", "finite_or_none", "json_ready", "recognition"]


def finite_or_none(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def json_ready(obj):
    """Recursively: numpy scalars/arrays -> Python, NaN/inf -> None, dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(obj)
    return obj


def recognition(probs, labels, num_classes: int) -> tuple[float, dict[int, float]]:
    """(overall accuracy, {class: accuracy}) of argmax(probs) == label; classes without samples: NaN."""
    pred = np.asarray(probs).argmax(1)
    labels = np.asarray(labels)
    hit = pred == labels
    per = {c: float(hit[labels == c].mean()) if (labels == c).any() else math.nan for c in range(num_classes)}
    return float(hit.mean()), per


def compute_metrics(real_feats, real_labels, fake_feats, fake_labels, fake_probs, train_counts, *,
                    num_classes: int, recog_probs=None, k: int = 5, many: int = 100, few: int = 20,
                    is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    prd_clusters: int | None = None, prd_runs: int = 10, seed: int = 0,
                    chunk: int | None = None, log=None) -> dict:
    """All metrics (see the module docstring). fake_labels may be None (unlabelled / unconditional samples:
    per-class and grouped metrics become null). recog_probs: (N, num_classes) probabilities of the data
    set's own recogniser for the fake samples (None: no recognition accuracy)."""
    log = log or (lambda msg: None)
    notes: list[str] = []
    real_feats = np.asarray(real_feats)
    fake_feats = np.asarray(fake_feats)
    real_labels = np.asarray(real_labels, dtype=np.int64)
    n_real, n_fake = real_feats.shape[0], fake_feats.shape[0]
    labelled = fake_labels is not None
    if labelled:
        fake_labels = np.asarray(fake_labels, dtype=np.int64)

    overall: dict = {}
    # FID
    if n_fake >= 2 and n_real >= 2:
        log("FID...")
        mu_r, s_r = feature_stats(real_feats)
        mu_f, s_f = feature_stats(fake_feats)
        overall["fid"] = fid_from_stats(mu_r, s_r, mu_f, s_f)
    else:
        overall["fid"] = None
        notes.append(f"FID needs at least 2 samples on each side (got {n_fake} generated, {n_real} real)")
    # KID
    if n_fake >= 2 and n_real >= 2:
        log("KID...")
        m, s = kid(real_feats, fake_feats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        overall["kid"] = {"mean": m, "std": s, "subsets": kid_subsets,
                          "subset_size": min(kid_subset_size, n_real, n_fake)}
    else:
        overall["kid"] = {"mean": None, "std": None, "subsets": kid_subsets, "subset_size": None}
    # IS
    if n_fake >= is_splits >= 1:
        # contiguous splits of class-ordered samples (sample.py --per-class writes class 0 first) would each
        # hold one class and score ~1: split a seeded permutation instead (i.i.d. samples: same distribution)
        perm = np.random.default_rng(seed).permutation(n_fake)
        m, s = inception_score(np.asarray(fake_probs)[perm], splits=is_splits)
        overall["inception_score"] = {"mean": m, "std": s, "splits": is_splits}
    else:
        overall["inception_score"] = {"mean": None, "std": None, "splits": is_splits}
        notes.append(f"Inception Score with {is_splits} splits needs at least {is_splits} samples, got {n_fake}")
    # improved precision / recall
    if n_fake > k and n_real > k:
        log(f"precision / recall (k={k})...")
        p, r = improved_precision_recall(real_feats, fake_feats, k=k, chunk=chunk)
    else:
        p = r = None
        notes.append(f"precision/recall with k={k} needs more than {k} samples on each side "
                     f"(got {n_fake} generated, {n_real} real)")
    overall["precision"], overall["recall"], overall["k"] = p, r, k
    # PRD
    clusters = prd_clusters if prd_clusters else max(1, min(20 * num_classes, min(n_real, n_fake) // 10))
    if prd_runs > 0 and clusters <= n_real + n_fake and n_fake >= 1:
        log(f"PRD ({clusters} clusters, {prd_runs} runs)...")
        res = prd(real_feats, fake_feats, num_clusters=int(clusters), num_runs=prd_runs, seed=seed)
        overall["prd"] = {"f_8": res["f_8"], "f_1_8": res["f_1_8"], "num_clusters": int(clusters),
                          "num_runs": prd_runs,
                          "note": "f_8 weights recall (coverage of the real data), f_1_8 weights precision"}
    else:
        overall["prd"] = {"f_8": None, "f_1_8": None, "num_clusters": int(clusters), "num_runs": prd_runs}
        if prd_runs > 0:
            notes.append(f"PRD skipped: {clusters} clusters for {n_real + n_fake} samples")
    # recognition
    recog_per: dict[int, float] = {}
    if recog_probs is not None and labelled:
        overall["recognition_accuracy"], recog_per = recognition(recog_probs, fake_labels, num_classes)
    else:
        overall["recognition_accuracy"] = None
        notes.append("recognition accuracy: " + ("the samples have no labels" if not labelled
                                                 else "no recogniser for this data set (use --downstream)"))

    counts = [int(c) for c in train_counts]
    groups = group_classes(counts, many=many, few=few)
    group_of = {c: g for g, cls in groups.items() for c in cls}
    per_class = []
    grouped: dict = {}
    if labelled:
        log("per-class metrics...")
        classes = list(range(num_classes))
        pc_fid = per_class_fid(real_feats, real_labels, fake_feats, fake_labels, classes=classes)
        pc_p, pc_r = per_class_precision_recall(real_feats, real_labels, fake_feats, fake_labels, k=k,
                                                chunk=chunk, classes=classes)
        n_fake_c = np.bincount(fake_labels, minlength=num_classes)
        n_real_c = np.bincount(real_labels, minlength=num_classes)
        short_fid = [c for c in classes if n_fake_c[c] < 2 or n_real_c[c] < 2]
        short_pr = [c for c in classes if n_fake_c[c] <= k or n_real_c[c] <= k]
        if short_fid:
            notes.append("per-class FID is null for class(es) " + ", ".join(
                f"{c} ({n_fake_c[c]} generated, {n_real_c[c]} real)" for c in short_fid)
                + ": it needs at least 2 samples of the class on each side")
        if short_pr:
            notes.append(f"per-class precision/recall (k={k}) is null for class(es) "
                         + ", ".join(str(c) for c in short_pr)
                         + f": it needs more than {k} samples of the class on each side")
        for c in classes:
            per_class.append({"class": c, "train_count": counts[c] if c < len(counts) else None,
                              "group": group_of.get(c), "num_samples": int(n_fake_c[c]),
                              "num_real": int(n_real_c[c]), "fid": finite_or_none(pc_fid[c]),
                              "precision": finite_or_none(pc_p[c]), "recall": finite_or_none(pc_r[c]),
                              "accuracy": finite_or_none(recog_per.get(c, math.nan))})
        pooled = grouped_fid(real_feats, real_labels, fake_feats, fake_labels, groups)
        fid_mean = group_average(pc_fid, groups)
        prec_mean = group_average(pc_p, groups)
        rec_mean = group_average(pc_r, groups)
        acc_mean = group_average(recog_per, groups) if recog_per else {g: math.nan for g in (*GROUPS, "all")}
        for g in (*GROUPS, "all"):
            grouped[g] = {"classes": groups[g] if g != "all" else sorted(group_of),
                          "fid_mean": finite_or_none(fid_mean[g]),
                          "fid_pooled": finite_or_none(pooled.get(g, overall["fid"] if g == "all" else math.nan)),
                          "precision": finite_or_none(prec_mean[g]), "recall": finite_or_none(rec_mean[g]),
                          "accuracy": finite_or_none(acc_mean[g])}
    else:
        notes.append("per-class and grouped metrics need labelled samples")
        for g in (*GROUPS, "all"):
            grouped[g] = {"classes": groups[g] if g != "all" else sorted(group_of), "fid_mean": None,
                          "fid_pooled": None, "precision": None, "recall": None, "accuracy": None}
    return json_ready({"overall": overall, "per_class": per_class, "groups": grouped,
                       "group_thresholds": {"many": f"train count > {many}", "medium": f"{few} <= count <= {many}",
                                            "few": f"count < {few}"},
                       "notes": notes})
