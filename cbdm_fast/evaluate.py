"""python -m cbdm_fast.evaluate: score generated images (the .npz of python -m cbdm_fast.sample).

Metrics (cbdm_fast.evaluation): FID, KID, Inception Score (10 splits), improved precision/recall
(k-NN manifolds, k=5), PRD (F_8 weights recall, F_1/8 weights precision: named by what they measure,
unlike the authors' printout), per-class FID / precision / recall, recognition accuracy (the fraction
of samples a recogniser assigns their own label), all also averaged over Many / Medium / Few-shot
classes (training-set count > --groups-many, between, < --groups-few). --downstream adds the
long-tail test of the literature: a classifier trained on the generated images only, tested on
real held-out images.

Feature spaces (--features):
  digits     (default for --dataset digits) a small CNN recogniser trained on the real digits training
             split in seconds on first use and cached (--cache-dir); its 64-d penultimate layer is the
             feature space, its softmax gives IS and recognition. Works offline.
  inception  (default for CIFAR and folders) the standard FID Inception-v3 (2048-d pool features);
             needs the weights file pt_inception-2015-12-05-6726825d.pth from pytorch-fid's GitHub
             releases, given with --inception-weights PATH or CBDM_FAST_INCEPTION. Nothing is downloaded.

Reference (real) images (--reference): digits: its balanced held-out test split (default);
CIFAR: the balanced full training set, as in the paper (default), or the test set; folders: the
whole folder. The training-set class counts (of the long-tailed split, --imb-factor) define the groups.

Output: a JSON file (--json, default <samples>.eval.json beside the samples) with every number,
a table on stdout, and with --report DIR, PNG plots and a markdown page. Metrics that cannot be
computed (e.g. a class with fewer than 2 samples for per-class FID) are null, with a note saying why.

Sampling first (--ckpt instead of --samples): python -m cbdm_fast.sample's main() runs in this process
with --per-class N or --num-samples N, --method, --omega, --sampler, --steps, --sample-batch-size
and evaluate's --seed, --device, --threads; the .npz goes beside the checkpoint (or --samples-out),
then it is evaluated exactly as with --samples. A failed sampling exits 2 after the sampler's message.

Several processes (torchrun): every rank extracts the features (and recogniser outputs) of its
contiguous slice of the generated images, and of the real images unless their features are cached;
rank 0 gathers them once, in rank order, computes the metrics, writes every file (the feature cache
included) and prints everything, errors of any rank included; all ranks exit with the same status.
With --ckpt the sampler shards the sampling over the ranks too (python -m cbdm_fast.sample under
torchrun, in its own process group), then the evaluation joins one. See evaluation/sharding.py.

Examples:
  python -m cbdm_fast.evaluate --samples runs/digits_cbdm/samples_cfg_w1_1000.npz --report runs/digits_cbdm/eval
  python -m cbdm_fast.evaluate --ckpt runs/digits_cbdm/ckpt_3000.pt --per-class 100 --omega 1.0
  torchrun --standalone --nproc_per_node 4 -m cbdm_fast.evaluate --samples samples.npz --dataset cifar100lt \\
      --data-root data/ --inception-weights ~/weights/pt_inception-2015-12-05-6726825d.pth
  python -m cbdm_fast.evaluate --samples samples.npz --dataset cifar100lt --data-root data/ \\
      --inception-weights ~/weights/pt_inception-2015-12-05-6726825d.pth --downstream
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.registry import DATASETS
from .evaluation.sampling import add_sampling_args, check_sampling_args

NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "cifar10lt": 32, "cifar100lt": 32}
NATIVE_CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "cifar10lt": 3, "cifar100lt": 3}
SAMPLE_HINT = ("expected the .npz written by python -m cbdm_fast.sample: 'images' uint8 (N, H, W, C) and "
               "'labels' int (N,)")


class EvalError(ValueError):
    """Bad input to the evaluation (file, labels, sizes, flags); the CLI prints it and exits with 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbdm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", metavar="PATH.npz", help="generated images (the .npz of python -m cbdm_fast.sample)")
    src.add_argument("--ckpt", metavar="PATH", help="sample from this checkpoint first (python -m cbdm_fast.sample's "
                     "machinery, in this process; see the sampling flags), then evaluate those samples")
    src.add_argument("--write-ref-stats", metavar="OUT.npz", help="evaluate nothing: write the feature mean and "
                     "covariance (mu, sigma) of the real reference set (--dataset, --reference, --features) as the "
                     ".npz that --fid-stats and other FID tools read; one process")
    d = p.add_argument_group("data set")
    d.add_argument("--dataset", choices=DATASETS, default="digits", help="the data set the model was trained on "
                   "(default digits)")
    d.add_argument("--data-root", metavar="PATH", help="CIFAR archive/folder or image folder (not for digits)")
    d.add_argument("--imb-factor", type=float, metavar="F", help="tail/head ratio of the long-tailed training "
                   "split the groups are taken from (default: the data set's, 0.1 digits, 0.01 CIFAR-LT)")
    d.add_argument("--imb-type", choices=("exp", "step"), default="exp", help="long-tail profile (default exp)")
    d.add_argument("--image-size", type=int, metavar="S", help="image size the model was trained at "
                   "(default: the data set's native size, 16 digits, 32 CIFAR; folders: the samples' size)")
    d.add_argument("--reference", choices=("auto", "train", "test"), default="auto",
                   help="real reference set: auto = test split for digits, balanced training set for CIFAR")
    f = p.add_argument_group("features")
    f.add_argument("--features", choices=("auto", "digits", "inception"), default="auto",
                   help="feature space (default auto: digits for --dataset digits, inception otherwise)")
    f.add_argument("--inception-weights", metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (or its folder); default $CBDM_FAST_INCEPTION")
    f.add_argument("--fid-stats", metavar="PATH.npz", help="also report FID against precomputed reference "
                   "statistics (an .npz with mu, sigma in the same feature space, e.g. the authors' CIFAR stats)")
    f.add_argument("--cache-dir", metavar="DIR", help="where the digits recogniser and the real features are "
                   "cached (default $CBDM_FAST_CACHE or ~/.cache/cbdm_fast)")
    f.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    m = p.add_argument_group("metrics")
    m.add_argument("--k", type=int, default=5, help="k of the k-NN precision/recall (default 5)")
    m.add_argument("--groups-many", type=int, default=100, metavar="N",
                   help="many-shot: training count > N (default 100)")
    m.add_argument("--groups-few", type=int, default=20, metavar="N", help="few-shot: training count < N "
                   "(default 20)")
    m.add_argument("--is-splits", type=int, default=10, metavar="N", help="Inception Score splits (default 10)")
    m.add_argument("--kid-subsets", type=int, default=100, metavar="N", help="KID subsets (default 100)")
    m.add_argument("--kid-subset-size", type=int, default=1000, metavar="N", help="KID subset size (default 1000)")
    m.add_argument("--prd-clusters", type=int, metavar="N", help="PRD k-means clusters (default: 20 x classes, "
                   "at most a tenth of the smaller set)")
    m.add_argument("--prd-runs", type=int, default=10, metavar="N", help="PRD runs (default 10; 0 skips PRD)")
    m.add_argument("--downstream", action="store_true",
                   help="train a classifier on the generated images, test it on real held-out images")
    m.add_argument("--downstream-steps", type=int, default=800, metavar="N",
                   help="training steps of the downstream classifier (default 800)")
    m.add_argument("--seed", type=int, default=0, help="seed of KID subsets, PRD k-means, classifiers, and of the "
                   "sampler with --ckpt (default 0)")
    add_sampling_args(p)
    o = p.add_argument_group("run and output")
    o.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    o.add_argument("--batch-size", type=int, default=200, metavar="B", help="feature extraction batch (default 200)")
    o.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    o.add_argument("--json", metavar="OUT.json", help="results file (default <samples>.eval.json)")
    o.add_argument("--report", metavar="DIR", help="write PNG plots, a sample grid and report.md here")
    o.add_argument("--run-dir", metavar="DIR", help="training run folder whose loss curves (TensorBoard log) and "
                   "eval.jsonl the report plots (default: the folder of the checkpoint the samples came from)")
    o.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def check_args(parser, args) -> None:
    for flag, value, low in (("--k", args.k, 1), ("--is-splits", args.is_splits, 1),
                             ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                             ("--prd-runs", args.prd_runs, 0), ("--downstream-steps", args.downstream_steps, 1),
                             ("--batch-size", args.batch_size, 1), ("--groups-few", args.groups_few, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        parser.error(f"--run-dir {args.run_dir} is not a folder")
    if args.groups_few > args.groups_many:
        parser.error(f"--groups-few ({args.groups_few}) must not exceed --groups-many ({args.groups_many})")
    for flag, value, low in (("--prd-clusters", args.prd_clusters, 1), ("--image-size", args.image_size, 4),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.dataset == "digits" and args.data_root is not None:
        parser.error("--data-root is not used by --dataset digits (it is built in)")
    if args.features == "digits" and args.dataset != "digits":
        parser.error(f"--features digits is the digits recogniser: only for --dataset digits, not {args.dataset}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    check_sampling_args(parser, args)


# ----------------------------------------------------------------------------------------------- inputs

def load_samples(path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(images uint8 (N, H, W, C), labels int64 (N,) or None when unlabelled, scalar metadata)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"samples file not found: {p}")
    if p.is_dir():
        raise EvalError(f"{p} is a folder; {SAMPLE_HINT}")
    try:
        data = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EvalError(f"cannot read {p} as an .npz archive ({type(exc).__name__}: {exc}); {SAMPLE_HINT}") from None
    if isinstance(data, np.ndarray):
        raise EvalError(f"{p} is a single .npy array, not an .npz archive; {SAMPLE_HINT}")
    meta = {}
    try:
        with data:
            if "images" not in data.files:
                raise EvalError(f"{p} has no 'images' array (it holds {data.files}); {SAMPLE_HINT}")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
            for key in data.files:
                if key in ("images", "labels"):
                    continue
                try:
                    v = data[key]
                except Exception:
                    continue
                if v.ndim == 0 and v.dtype.kind in "biufU":
                    meta[key] = v.item()
    except EvalError:
        raise
    except Exception as exc:  # a truncated or corrupt member (zlib, CRC, header errors)
        raise EvalError(f"cannot read {p}: the archive is corrupt ({type(exc).__name__}: {exc}); "
                        f"{SAMPLE_HINT}") from None
    if images.dtype != np.uint8:
        raise EvalError(f"{p}: images have dtype {images.dtype}; expected uint8 pixels 0..255 "
                        f"(x in [-1, 1] maps to round((x + 1) * 127.5))")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise EvalError(f"{p}: images have shape {images.shape}; expected (N, H, W, C) with C = 1 or 3")
    if images.shape[0] == 0:
        raise EvalError(f"{p}: no images")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise EvalError(f"{p}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise EvalError(f"{p}: {images.shape[0]} images but {labels.shape[0]} labels")
        labels = labels.astype(np.int64)
        if (labels == -1).all():
            labels = None  # unconditional samples (python -m cbdm_fast.sample --method uncond)
    return images, labels, meta


def check_labels(labels: np.ndarray, num_classes: int, dataset: str, path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise EvalError(f"{path}: label {int(labels[i])} at index {i} is out of range: --dataset {dataset} has "
                        f"classes 0..{num_classes - 1} ({bad.size} bad label(s))")


def load_real(args, size: int, channels: int):
    """(long-tailed training set, reference set, downstream test set, reference description)."""
    from .data import load_dataset, load_digits_lt

    name = args.dataset
    reference = args.reference
    if name == "digits":
        if channels != 1:
            raise EvalError(f"the samples have {channels} channels but --dataset digits images are grey (1 channel)")
        train = load_dataset("digits", imb_factor=args.imb_factor, imb_type=args.imb_type, image_size=size)
        test = load_digits_lt(split="test", image_size=size)
        if reference in ("auto", "test"):
            return train, test, test, "digits held-out test split (balanced)"
        return train, load_digits_lt(split="train_full", image_size=size), test, \
            "digits training split (balanced, before the long-tailed selection)"
    root = args.data_root
    resize = None if size == NATIVE_SIZE.get(name) else size
    if name.startswith("cifar"):
        if channels != 3:
            raise EvalError(f"the samples have {channels} channel(s) but CIFAR images are RGB (3 channels)")
        base = name.removesuffix("lt")
        lt = name.endswith("lt")
        train = load_dataset(name, root, imb_factor=args.imb_factor if lt else None, imb_type=args.imb_type,
                             image_size=resize)
        test = load_dataset(base, root, image_size=resize, train=False)
        if reference in ("auto", "train"):
            ref = train if not lt else load_dataset(base, root, image_size=resize)
            return train, ref, test, f"{base} training set (balanced, all {len(ref)} images)"
        return train, test, test, f"{base} test set"
    lt = name == "folderlt"
    train = load_dataset(name, root, imb_factor=args.imb_factor if lt else None, imb_type=args.imb_type,
                         image_size=size, channels=channels)
    whole = load_dataset("folder", root, image_size=size, channels=channels)
    return train, whole, whole, f"the whole image folder {root} ({len(whole)} images; not held out)"


def build_extractors(args, device, cache_dir, log, shards):
    """(feature extractor, digits recogniser or None), the same on every rank."""
    from .evaluation.digits_classifier import digits_classifier
    from .evaluation.features import DigitsFeatures, InceptionFeatures
    from .evaluation.sharded_features import share_recogniser

    kind = args.features if args.features != "auto" else ("digits" if args.dataset == "digits" else "inception")
    recogniser = None
    if args.dataset == "digits":
        # rank 0 alone trains or loads it, so only rank 0 writes its cache
        model = shards.checked(lambda: digits_classifier(cache_dir=cache_dir, seed=args.seed,
                                                          use_cache=not args.no_cache, log=log)
                               if shards.is_main else None)
        recogniser = DigitsFeatures(share_recogniser(model, shards), batch_size=max(args.batch_size, 512))
    if kind == "digits":
        return recogniser, recogniser
    inception = shards.checked(lambda: InceptionFeatures(args.inception_weights, device=device,
                                                         batch_size=args.batch_size))
    return inception, recogniser


def resolve_device(name: str):
    """dist.resolve_device, its error as an EvalError (exit 2 with the message)."""
    from .dist import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as exc:
        raise EvalError(str(exc)) from None


# ----------------------------------------------------------------------------------------------- main

@dataclass
class Inputs:
    """The generated images and the real data sets they are scored against."""
    images: np.ndarray
    labels: np.ndarray | None
    meta: dict
    size: int
    channels: int
    train: object
    ref: object
    test: object
    ref_desc: str


def load_inputs(args, log) -> Inputs:
    """Read and check the samples, then load the real data (raises EvalError)."""
    images, labels, meta = load_samples(args.samples)
    n, h, w, c = images.shape
    size = args.image_size or NATIVE_SIZE.get(args.dataset, h)
    if (h, w) != (size, size):
        hint = (f"; if the model was trained with --image-size {h}, pass --image-size {h}" if h == w else "")
        raise EvalError(f"{args.samples}: the samples are {h}x{w} but --dataset {args.dataset} images are "
                        f"{size}x{size}{hint}")
    expected_c = NATIVE_CHANNELS.get(args.dataset)
    if expected_c is not None and c != expected_c:
        raise EvalError(f"{args.samples}: the samples have {c} channel(s) but --dataset {args.dataset} images have "
                        f"{expected_c}")
    if args.downstream and labels is None:
        raise EvalError(f"--downstream needs labelled samples, but {args.samples} has no labels (or all -1)")
    log(f"loading the {args.dataset} data set...")
    try:
        train, ref, test, ref_desc = load_real(args, size, c)
    except EvalError:
        raise
    except ValueError as exc:  # DatasetError and friends: missing --data-root, bad archive
        raise EvalError(str(exc)) from None
    if labels is not None:
        check_labels(labels, train.num_classes, args.dataset, args.samples)
    return Inputs(images, labels, meta, size, c, train, ref, test, ref_desc)


def evaluate(args, log, shards=None, device=None) -> dict | None:
    """Run the whole evaluation for parsed ``args``; the result dict on rank 0, None on the other
    ranks (raises EvalError, or ShardError under torchrun)."""
    from .evaluation.digits_classifier import default_cache_dir
    from .evaluation.sharded_features import gather_features
    from .evaluation.sharding import Shards

    shards = shards or Shards()
    device = device if device is not None else resolve_device(args.device)
    cache_dir = None if args.no_cache else (Path(args.cache_dir).expanduser() if args.cache_dir
                                             else default_cache_dir())
    inputs = shards.checked(lambda: load_inputs(args, log))
    extractor, recogniser = build_extractors(args, device, cache_dir, log, shards)
    if shards.enabled:
        log(f"feature extraction sharded over {shards.world_size} ranks")
    feats = gather_features(shards, extractor, recogniser, inputs.images, inputs.ref.images, cache_dir, log)
    if not shards.is_main:
        return None
    return score(args, inputs, extractor, feats, log)


def score(args, inputs: Inputs, extractor, feats, log) -> dict:
    """Every metric from the features, and the result dict around them (rank 0)."""
    import torch

    from . import __version__
    from .evaluation.digits_classifier import DIGITS_INPUT_SIZE
    from .evaluation.groups import group_classes
    from .evaluation.metrics_all import compute_metrics, json_ready

    images, labels, train, ref, test = inputs.images, inputs.labels, inputs.train, inputs.ref, inputs.test
    n, size, c, num_classes = images.shape[0], inputs.size, inputs.channels, train.num_classes
    real_feats, fake_feats = feats.real_feats, feats.fake_feats
    counts = train.counts().tolist()
    metrics = compute_metrics(real_feats, ref.labels, fake_feats, labels, feats.fake_probs, counts,
                              num_classes=num_classes, recog_probs=feats.recog_probs, k=args.k,
                              many=args.groups_many, few=args.groups_few, is_splits=args.is_splits,
                              kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                              prd_clusters=args.prd_clusters, prd_runs=args.prd_runs, seed=args.seed, log=log)
    if args.fid_stats:
        metrics["overall"].update(fid_vs_stats(args.fid_stats, fake_feats, extractor))
    result = {
        "samples": str(args.samples), "num_samples": int(n), "dataset": args.dataset, "image_size": int(size),
        "channels": int(c), "num_classes": int(num_classes), "class_names": list(train.class_names),
        "labelled": labels is not None,
        "samples_per_class": (np.bincount(labels, minlength=num_classes).tolist() if labels is not None else None),
        "train_counts": counts,
        "groups": group_classes(counts, many=args.groups_many, few=args.groups_few),
        "reference": {"split": args.reference, "description": inputs.ref_desc, "num_images": len(ref),
                      "per_class": ref.counts().tolist()},
        "features": {"kind": extractor.kind, "id": extractor.id, "dim": int(real_feats.shape[1]),
                     "description": extractor.description},
        "metrics": metrics,
        "settings": {"k": args.k, "groups_many": args.groups_many, "groups_few": args.groups_few,
                     "is_splits": args.is_splits, "kid_subsets": args.kid_subsets,
                     "kid_subset_size": args.kid_subset_size, "prd_runs": args.prd_runs, "seed": args.seed},
        "sample_meta": inputs.meta,
        "versions": {"cbdm_fast": __version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    if args.downstream:
        from .evaluation.downstream import downstream_recognition

        log(f"downstream: training a classifier on the {n} generated images ({args.downstream_steps} steps)...")
        input_size = DIGITS_INPUT_SIZE if args.dataset == "digits" else size
        result["downstream"] = downstream_recognition(images, labels, test.images, test.labels, num_classes,
                                                      result["groups"], size=input_size,
                                                      steps=args.downstream_steps, seed=args.seed)
        result["downstream"]["test_set"] = "the reference's held-out test split" if test is ref else \
            ("the data set's test split" if not args.dataset.startswith("folder") else "the whole folder")
    return json_ready(result)


def write_reference_stats(args, log) -> int:
    """--write-ref-stats: mu and sigma of the reference images' features (the set --reference picks,
    features cached as evaluate caches them) in the pytorch-fid .npz layout; exit status."""
    from .evaluation.digits_classifier import default_cache_dir
    from .evaluation.features import extract
    from .evaluation.fid import feature_stats, save_stats
    from .evaluation.sharding import Shards

    size = args.image_size or NATIVE_SIZE.get(args.dataset)
    if size is None:
        raise EvalError(f"--write-ref-stats with --dataset {args.dataset} needs --image-size (the size the "
                        f"samples will have)")
    cache_dir = None if args.no_cache else (Path(args.cache_dir).expanduser() if args.cache_dir
                                             else default_cache_dir())
    try:
        _, ref, _, ref_desc = load_real(args, size, NATIVE_CHANNELS.get(args.dataset, 3))
    except EvalError:
        raise
    except ValueError as exc:  # DatasetError and friends: missing --data-root, bad archive
        raise EvalError(str(exc)) from None
    extractor, _ = build_extractors(args, resolve_device(args.device), cache_dir, log, Shards())
    log(f"features of {len(ref)} real reference images: {ref_desc} ({extractor.description})...")
    feats, _ = extract(extractor, ref.images, cache_dir)
    mu, sigma = feature_stats(feats)
    out = save_stats(args.write_ref_stats, mu, sigma)
    print(f"wrote {out}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} of {len(ref)} images ({ref_desc}; "
          f"{extractor.description})")
    return 0


def fid_vs_stats(path, fake_feats, extractor) -> dict:
    """FID of the generated features against saved reference statistics (--fid-stats)."""
    from .evaluation.fid import feature_stats, fid_from_stats, load_stats

    try:
        mu_ref, sigma_ref = load_stats(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise EvalError(f"--fid-stats {path}: {exc}") from None
    if mu_ref.shape[0] != fake_feats.shape[1]:
        raise EvalError(f"--fid-stats {path} holds {mu_ref.shape[0]}-d statistics but the "
                        f"{extractor.kind} features are {fake_feats.shape[1]}-d")
    return {"fid_vs_stats": fid_from_stats(*feature_stats(fake_feats), mu_ref, sigma_ref),
            "fid_stats_file": str(path)}


def sample_first(args, log) -> int:
    """--ckpt: python -m cbdm_fast.sample's main() writes the samples file; its exit status.

    Every rank calls it: under torchrun the sampler shards the images over the ranks itself, in a
    process group of its own that it destroys before the evaluation joins one.
    """
    from .evaluation.sampling import run_sampler, sampler_argv, samples_path

    argv = sampler_argv(args, args.device, samples_path(args))
    log(f"sampling: python -m cbdm_fast.sample {' '.join(argv)}")
    return run_sampler(argv, args.quiet)


def run(args, shards, device, log, start: float, sampled: int) -> int:
    """Evaluate (the samples of --ckpt once every rank sampled them), and on rank 0 write the outputs;
    this rank's exit status."""
    from .evaluation.sampling import samples_path
    from .evaluation.sharding import ShardError

    try:
        if args.ckpt is not None:
            status = shards.agree_on_code(sampled)
            if status != 0:
                raise EvalError(f"sampling from --ckpt {args.ckpt} failed (python -m cbdm_fast.sample exit status "
                                f"{status}, its message is above); nothing was evaluated")
            args.samples = str(samples_path(args))
        result = evaluate(args, log, shards, device)
    except (EvalError, ShardError, ValueError, OSError) as exc:  # ValueError/OSError: e.g. the Inception weights
        if shards.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if not shards.is_main:
        return 0
    result["seconds"] = round(time.perf_counter() - start, 2)
    return write_outputs(args, result)


def write_outputs(args, result: dict) -> int:
    """The JSON file, the table on stdout and the --report folder."""
    from .files.atomic import atomic_write
    from .evaluation.report import summary_lines, write_report

    samples = Path(args.samples)
    out = Path(args.json) if args.json else samples.with_name(samples.stem + ".eval.json")
    text = json.dumps(result, indent=1, allow_nan=False)
    try:
        atomic_write(out, lambda f: f.write(text.encode()), durable=False)
    except OSError as exc:
        print(f"error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    print(f"{result['num_samples']} samples of {result['dataset']} ({result['image_size']}x{result['image_size']}), "
          f"features: {result['features']['description']}; reference: {result['reference']['description']} "
          f"({result['reference']['num_images']} images)")
    print(summary_lines(result), end="")
    print(f"wrote {out}")
    if args.report:
        from .evaluation.run_log import find_run_dir
        images, labels, meta = load_samples(args.samples)
        run_dir = find_run_dir(meta, args.run_dir)
        try:
            md = write_report(result, images, labels, args.report, run_dir=run_dir)
        except OSError as exc:
            print(f"error: cannot write the report in {args.report}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the report {md}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        import torch

        from .dist import from_env
        from .evaluation.sharding import start as start_shards

        if not from_env().is_main:
            log = lambda msg: None  # noqa: E731  (rank 0 alone reports progress)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.write_ref_stats is not None:
            if from_env().enabled:
                raise EvalError("--write-ref-stats runs in one process: start it without torchrun")
            return write_reference_stats(args, log)
        sampled = sample_first(args, log) if args.ckpt is not None else 0
        shards, device = start_shards(resolve_device(args.device))
    except (ValueError, OSError) as exc:  # EvalError (--device), a bad torchrun environment
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .evaluation.sharding import stop

    try:
        code = run(args, shards, device, log, start, sampled)
        return shards.agree_on_code(code)  # all ranks exit alike
    finally:
        stop(shards)


if __name__ == "__main__":
    sys.exit(main())
