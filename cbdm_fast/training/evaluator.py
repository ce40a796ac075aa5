"""Evaluation during training (--eval-every N): score a small class-balanced set of EMA samples with
the metrics of python -m cbdm_fast.evaluate, without changing the training run in any way.

The training monitor (cbdm_fast/training/monitor.py) builds the evaluator, logs and records its results.

Once, before the first step (rank 0):
  feature network: for the built-in digits, the project's digits recogniser (trained in seconds on the
    digits training split, cached under <logdir>/eval_cache; the same recipe and seed as
    python -m cbdm_fast.evaluate, so the numbers are on the same scale); for any other data set the FID
    Inception-v3, which needs its weights file (--inception-weights PATH or $CBDM_FAST_INCEPTION);
    without it --eval-every is an error at start.
  reference features: the real images python -m cbdm_fast.evaluate scores against by default (digits:
    the balanced held-out test split; CIFAR: the balanced training set; folders: the whole folder), at
    most REFERENCE_MAX of them (a seeded class-balanced subset), extracted once and cached there too.
At every evaluation:
  labels: the same number of every class (class 0 first; --eval-samples rounded up to a whole number
    per class, default 10 per class); per-sample noise from a fixed seed (CounterNoise of --seed + 2),
    so for the same weights every evaluation draws the same images;
  sampling: --eval-sampler (DDIM with eta 0, or DPM-Solver++(2M) on its default grid) over --eval-steps
    steps from the EMA model, guided as the sample grids are (cfg/cbdm: eps = eps_c + omega (eps_c - eps_u)
    with omega = --sample-omega), through cbdm_fast.samplers.make_sampler('fast') on the run's device;
  metrics: compute_metrics (FID, KID, improved precision/recall with k = 5, recognition accuracy where
    the data set has a recogniser, per class and averaged over many/medium/few-shot classes),
    flattened into {name: float} by ``flatten_metrics``. Values that cannot be computed at this sample
    count (e.g. per-class recall with fewer than k + 1 samples of a class) are left out.

Non-interference. The sampler draws no random numbers from any generator (counter-based noise, and
both samplers are deterministic after x_T); the metrics use their own seeded generators; ``preserved_state`` still
restores every global RNG (torch's CPU and device generators, numpy's, Python's) and every module's
train/eval flag on the way out. The data stream is never touched. The sampler never modifies the
model (no channels_last conversion, no patching, no compilation), so the compiled training step,
whose CUDA graph reads and writes the EMA weights by address, is undisturbed; the sampler's own CUDA
graph lives in its own memory pool and is released after each evaluation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import GUIDED_METHODS, eval_steps_of

__all__ = ["DuringTrainingEvaluator", "missing_feature_network", "samples_per_class", "flatten_metrics",
           "preserved_state", "append_jsonl", "read_jsonl", "summary_line", "JSONL_NAME", "CACHE_FOLDER"]

PER_CLASS_DEFAULT = 10      # --eval-samples default: 10 images of every class
SEED_OFFSET = 2             # per-sample noise seed = --seed + 2 (the sample grids use --seed + 1)
SAMPLE_BATCH = 256          # images per sampler call (one CUDA graph of this batch size)
REFERENCE_MAX = 10_000      # real reference images at most: k-NN precision/recall is O(N^2) on the host
KID_SUBSETS = 10            # fewer than evaluate's 100: the samples are few and this runs often
K_NN = 5                    # k of the improved precision/recall (evaluate's default)
GROUP_MANY, GROUP_FEW = 100, 20  # many: training count > 100, few: < 20 (evaluate's defaults)
CACHE_FOLDER = "eval_cache"
JSONL_NAME = "eval.jsonl"


# ------------------------------------------------------------------------------------ configuration
def missing_feature_network(dataset: str, inception_weights: Optional[str]) -> Optional[str]:
    """Why --eval-every cannot score ``dataset`` (None when it can): only the built-in digits have a
    recogniser of their own; every other data set needs the FID Inception weights file."""
    from ..evaluation.inception import ENV_WEIGHTS, WEIGHTS_NAME

    if dataset == "digits" or inception_weights or os.environ.get(ENV_WEIGHTS):
        return None
    return (f"--eval-every on --dataset {dataset} scores samples with the FID Inception network, which needs "
            f"its weights: pass --inception-weights PATH (the file {WEIGHTS_NAME} from pytorch-fid's GitHub "
            f"releases, or its folder) or set {ENV_WEIGHTS}; nothing is downloaded")


def samples_per_class(eval_samples: Optional[int], num_class: int) -> int:
    """Images of each class per evaluation: PER_CLASS_DEFAULT, or eval_samples / num_class rounded up
    (every class gets the same count, so per-class values compare)."""
    if eval_samples is None:
        return PER_CLASS_DEFAULT
    return max(1, -(-int(eval_samples) // num_class))


def sampling_guidance(method: str, omega: float) -> tuple[str, float]:
    """(sampler method, omega) for a training method, as the sample grids use: cfg and cbdm sample with
    classifier-free guidance of strength --sample-omega, ddpm conditionally, uncond unconditionally."""
    if method in GUIDED_METHODS:
        return "cfg", float(omega)
    return ("cond" if method == "ddpm" else "uncond"), 0.0


# ------------------------------------------------------------------------------------ real images
def reference_images(cfg, train_data, image_size: int):
    """(LabeledImages, description): the real set python -m cbdm_fast.evaluate uses by default
    (--reference auto), at the training resolution."""
    from ..data import load_dataset, load_digits_lt

    d = cfg.data
    if d.dataset == "digits":
        return load_digits_lt(split="test", image_size=image_size), "digits held-out test split (balanced)"
    if d.dataset in ("cifar10lt", "cifar100lt"):
        base = d.dataset.removesuffix("lt")
        return load_dataset(base, d.root, image_size=d.image_size), f"{base} training set (balanced)"
    if d.dataset == "folderlt":
        return load_dataset("folder", d.root, image_size=d.image_size), f"the whole image folder {d.root}"
    return train_data, f"the {d.dataset} training set"  # cifar10, cifar100, folder: balanced already


def balanced_subset(images: np.ndarray, labels: np.ndarray, num_classes: int, limit: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All images when there are at most ``limit``, else limit // num_classes of each class (a seeded
    choice, in the original order)."""
    if len(labels) <= limit:
        return images, labels
    rng = np.random.RandomState(seed)
    per_class = max(1, limit // num_classes)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    index = np.sort(np.concatenate(keep))
    return images[index], labels[index]


def feature_network(dataset: str, inception_weights: Optional[str], cache_dir: Path, device, log):
    """(extractor, recognises): the digits recogniser, whose softmax also gives the recognition accuracy,
    or the FID Inception network, which knows no class of the data set (no accuracy)."""
    from ..evaluation.features import DigitsFeatures, InceptionFeatures

    if dataset == "digits":
        from ..evaluation.digits_classifier import digits_classifier

        return DigitsFeatures(digits_classifier(cache_dir=cache_dir, seed=0, log=log)), True
    from ..evaluation.inception import ENV_WEIGHTS, InceptionWeightsError

    try:
        return InceptionFeatures(inception_weights, device=device), False
    except InceptionWeightsError as exc:  # name where the path came from
        source = f"--inception-weights {inception_weights}" if inception_weights else f"${ENV_WEIGHTS}"
        raise ValueError(f"{source}: {exc}") from None


# ------------------------------------------------------------------------------------ isolation
@contextlib.contextmanager
def preserved_state(modules, device: torch.device):
    """On exit, restore every global RNG and the train/eval flag of every sub-module of ``modules``.

    The device generator is written back only when it changed: under the compiled backend the
    training step's CUDA graph advances it, and nothing here should touch it needlessly.
    """
    cpu = torch.get_rng_state()
    on_cuda = device.type == "cuda"
    dev = torch.cuda.get_rng_state(device) if on_cuda else None
    np_state, py_state = np.random.get_state(), random.getstate()
    modes = [(m, m.training) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if on_cuda and not torch.equal(torch.cuda.get_rng_state(device), dev):
            torch.cuda.set_rng_state(dev, device)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for module, training in modes:
            module.training = training


# ------------------------------------------------------------------------------------ metrics
def flatten_metrics(metrics: dict) -> dict[str, float]:
    """compute_metrics' nested result -> {name: float}:
        fid, kid, kid_std, precision, recall, accuracy (recognition);
        fid_<g> (FID of the group's classes pooled), precision_<g>, recall_<g>, accuracy_<g> (means of
        the per-class values) for g in many, medium, few;
        accuracy_class_<c> for every class c.
    None (not computable at this sample count) and non-finite values are left out."""
    from ..evaluation.groups import GROUPS

    overall, groups = metrics["overall"], metrics["groups"]
    flat = {"fid": overall["fid"], "kid": overall["kid"]["mean"], "kid_std": overall["kid"]["std"],
            "precision": overall["precision"], "recall": overall["recall"],
            "accuracy": overall["recognition_accuracy"]}
    for g in GROUPS:
        flat[f"fid_{g}"] = groups[g]["fid_pooled"]
        for name in ("precision", "recall", "accuracy"):
            flat[f"{name}_{g}"] = groups[g][name]
    for row in metrics["per_class"]:
        flat[f"accuracy_class_{row['class']}"] = row["accuracy"]
    return {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(float(v))}


class DuringTrainingEvaluator:
    """Built once on rank 0 (cbdm_fast/training/monitor.py); ``evaluate()`` -> {metric: float} of the EMA
    model now. cfg: the run's TrainConfig; ema, schedule, device: what it samples with; data: the training
    set (its class counts group the classes; some data sets are their own reference); amp: the run's
    bf16 autocast (used on CUDA)."""

    def __init__(self, cfg, ema, schedule, data, device: torch.device, amp: bool, log=print):
        run = cfg.run
        problem = missing_feature_network(cfg.data.dataset, run.inception_weights)
        if problem is not None:
            raise ValueError(problem)
        self.model, self.schedule, self.device = ema, schedule, device
        _, height, width, channels = data.images.shape
        self.shape = (channels, height, width)
        self.num_class = data.num_classes
        self.method, self.omega = sampling_guidance(cfg.method.method, run.sample_omega)
        self.sampler, self.steps, self.seed = run.eval_sampler, eval_steps_of(run), run.seed + SEED_OFFSET
        self.amp = bool(amp) and self.device.type == "cuda"  # bf16 as training; CPU: fp32
        self.labels, self.num_samples = self._labels(run.eval_samples)
        self.train_counts = data.counts().tolist()
        cache_dir = Path(run.logdir) / CACHE_FOLDER
        with preserved_state([], self.device):  # the recogniser trains with its own seeds; be sure
            self.extractor, self.recognises = feature_network(cfg.data.dataset, run.inception_weights,
                                                              cache_dir, self.device, log)
            ref, self.reference = reference_images(cfg, data, height)
            images, self.ref_labels = balanced_subset(ref.images, ref.labels, ref.num_classes, REFERENCE_MAX)
            from ..evaluation.features import extract

            self.ref_feats, _ = extract(self.extractor, images, cache_dir)
        self.num_reference = len(self.ref_labels)

    def _labels(self, eval_samples: Optional[int]):
        """(labels (n,) or None for unconditional models, n)."""
        from ..samplers import class_balanced_labels

        if self.method == "uncond":
            n = eval_samples if eval_samples is not None else PER_CLASS_DEFAULT * self.num_class
            return None, int(n)
        labels = class_balanced_labels(samples_per_class(eval_samples, self.num_class), self.num_class)
        return labels, len(labels)

    def describe(self) -> str:
        guidance = f", omega {self.omega:g}" if self.method == "cfg" else f" ({self.method})"
        return (f"{self.num_samples} samples, {self.steps} {self.sampler} steps{guidance}; features: "
                f"{self.extractor.description}; reference: {self.reference} ({self.num_reference} images)")

    @torch.no_grad()
    def _sample(self) -> np.ndarray:
        """uint8 (n, H, W, C): global sample indices 0..n-1 (their per-sample noise), in batches."""
        from ..files.images import to_uint8
        from ..samplers import make_sampler

        sampler = make_sampler("fast", self.model, self.schedule, self.shape, seed=self.seed, sampler=self.sampler,
                               steps=self.steps, omega=self.omega, method=self.method, amp=self.amp)
        out = []
        for start in range(0, self.num_samples, SAMPLE_BATCH):
            index = torch.arange(start, min(start + SAMPLE_BATCH, self.num_samples))
            y = None if self.labels is None else self.labels[start:start + SAMPLE_BATCH]
            out.append(to_uint8(sampler(y, index)))
        return np.concatenate(out)

    def evaluate(self) -> dict[str, float]:
        from ..evaluation.metrics_all import compute_metrics

        with preserved_state([self.model], self.device):
            self.model.eval()
            images = self._sample()
            feats, probs = self.extractor(images)
            labels = None if self.labels is None else self.labels.numpy()
            metrics = compute_metrics(self.ref_feats, self.ref_labels, feats, labels, probs, self.train_counts,
                                      num_classes=self.num_class, recog_probs=probs if self.recognises else None,
                                      k=K_NN, many=GROUP_MANY, few=GROUP_FEW, is_splits=1,
                                      kid_subsets=KID_SUBSETS, prd_runs=0, seed=0)
        return flatten_metrics(metrics)


# ------------------------------------------------------------------------------------ the log file
def append_jsonl(path, record: dict) -> None:
    """Append ``record`` as one JSON line: one write to a file opened for appending, then fsync.

    Earlier lines are never rewritten, so a run killed while writing can at worst tear its own line;
    a torn last line left by such a run is closed with a newline first, so the new line parses.
    """
    path = Path(path)
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(path):
            line = b"\n" + line
        view = memoryview(line)
        while view:  # a regular file takes it in one write; loop in case it does not
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path) -> list[dict]:
    """The records of an eval.jsonl, skipping a torn line; a step evaluated twice (a resumed run redoes
    the steps after its checkpoint) keeps its last record."""
    by_step: dict = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step[record.get("step")] = record
    return list(by_step.values())


def summary_line(step: int, metrics: dict, seconds: float, num_samples: int, steps: int, sampler: str) -> str:
    """One printed line: the headline metrics of an evaluation."""
    shown = [f"{k} {metrics[k]:.4g}" for k in ("fid", "kid", "precision", "recall", "accuracy") if k in metrics]
    return (f"eval step {step}: {' '.join(shown)} ({num_samples} samples, {steps} {sampler} steps, "
            f"{seconds:.1f} s)")
