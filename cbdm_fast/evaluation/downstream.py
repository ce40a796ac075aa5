"""Downstream recognition, the long-tail test of a generator: train a classifier on the GENERATED images
only (with the labels they were generated for), test it on REAL held-out images.

    downstream_recognition(train_images, train_labels, test_images, test_labels, num_classes, groups,
                           size=None, steps=800, seed=0) -> dict(accuracy, per_class, groups, ...)
The classifier is cbdm_fast.evaluation.digits_classifier.SmallCNN trained by train_classifier (same recipe
and seed handling as the digits recogniser), so numbers are comparable between generators.
"""
from __future__ import annotations

import numpy as np

from .digits_classifier import classifier_predict, train_classifier
from .groups import GROUPS, group_average
from .metrics_all import json_ready, recognition

__all__ = ["downstream_recognition"]


def downstream_recognition(train_images, train_labels, test_images, test_labels, num_classes: int,
                           groups: dict, size: int | None = None, steps: int = 800, seed: int = 0) -> dict:
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    if train_labels.size == 0 or (train_labels < 0).any():
        raise ValueError("downstream recognition needs labelled generated images (labels >= 0)")
    model = train_classifier(train_images, train_labels, num_classes, size=size, seed=seed, steps=steps)
    _, probs = classifier_predict(model, test_images)
    acc, per = recognition(probs, test_labels, num_classes)
    counts = np.bincount(train_labels, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    grouped = group_average(per, groups)
    return json_ready({
        "accuracy": acc,
        "per_class": [{"class": c, "accuracy": per[c], "num_train_generated": int(counts[c])}
                      for c in range(num_classes)],
        "groups": {g: grouped[g] for g in (*GROUPS, "all")},
        "num_train_generated": int(train_labels.size), "num_test_real": int(test_labels.size),
        "steps": steps, "seed": seed, "input_size": int(model.config["size"]),
        "classes_without_samples": missing,
        "note": "classifier trained on the generated images only, tested on the real held-out images",
    })
