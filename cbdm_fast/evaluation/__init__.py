"""Evaluation metrics on feature vectors (the Inception network that produces them lives elsewhere).

Features are (N, D) torch tensors or numpy arrays; work runs on the features' device.
    fid_from_stats(mu1, sigma1, mu2, sigma2), feature_stats(x), fid(a, b), save_stats / load_stats (.npz: mu, sigma)
    kid(a, b, subsets=100, subset_size=1000, seed=0) -> (mean, std)
    inception_score(probs, splits=10) -> (mean, std)
    improved_precision_recall(real, fake, k=5, chunk=None) -> (precision, recall)
    prd(real, fake, num_clusters, num_angles=1001, num_runs=10, seed=0) -> dict(precision, recall, f_8, f_1_8)
        f_8 is recall-like, f_1_8 precision-like
    group_classes(train_counts, many=100, few=20), per_class_fid, per_class_precision_recall,
    group_average, grouped_fid
    knn: kth_nn_radii, within_any_ball (chunked exact k-NN)
Evaluation pipeline (python -m cbdm_fast.evaluate):
    compute_metrics (every metric + per-class + many/medium/few, JSON-ready), digits_classifier /
    train_classifier / SmallCNN (the digits recogniser: feature space, IS, recognition accuracy),
    FIDInceptionV3 / load_fid_inception (the FID Inception-v3, weights from a local file),
    downstream_recognition (train on generated, test on real), write_report (PNG plots + markdown),
    sharding / sharded_features (the feature step split over torchrun ranks, gathered on rank 0),
    sampling (--ckpt: a cbdm_fast.sampling job run in-process before the evaluation),
    inputs (the samples file and the real data sets), pipeline (run_evaluation: the whole CLI run)
"""
from .fid import feature_stats, fid, fid_from_stats, load_stats, save_stats
from .groups import (class_counts, group_average, group_classes, grouped_fid, per_class_fid,
                     per_class_precision_recall)
from .inception_score import inception_score
from .kid import kid
from .knn import kth_nn_radii, kth_nn_sq_radii, within_any_ball
from .prd import prd
from .precision_recall import improved_precision_recall
from .metrics_all import compute_metrics
from .digits_classifier import SmallCNN, digits_classifier, train_classifier
from .downstream import downstream_recognition
from .inception import FIDInceptionV3, load_fid_inception
from .report import write_report

__all__ = ["feature_stats", "fid", "fid_from_stats", "load_stats", "save_stats", "kid", "inception_score",
           "improved_precision_recall", "prd", "group_classes", "class_counts", "per_class_fid",
           "per_class_precision_recall", "group_average", "grouped_fid", "kth_nn_radii", "kth_nn_sq_radii",
           "within_any_ball", "compute_metrics", "SmallCNN", "digits_classifier", "train_classifier",
           "downstream_recognition", "FIDInceptionV3", "load_fid_inception", "write_report"]
