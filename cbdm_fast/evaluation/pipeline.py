"""The evaluation behind python -m cbdm_fast.evaluate, for its parsed flags (``run_evaluation``): sample
first (--ckpt, through the sampling library), extract the features on every rank, score on rank 0,
write the JSON, the table and the report; or write the reference statistics alone."""
from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import __version__, dist
from ..files.atomic import atomic_write
from ..interrupts import EXIT_INTERRUPTED, reason as interrupt_reason, sigterm_interrupts
from .digits_classifier import DIGITS_INPUT_SIZE, default_cache_dir, digits_classifier
from .downstream import downstream_recognition
from .features import DigitsFeatures, InceptionFeatures, extract
from .fid import feature_stats, fid_from_stats, load_stats, save_stats
from .groups import group_classes
from .inputs import NATIVE_CHANNELS, NATIVE_SIZE, EvalError, Inputs, load_inputs, load_real, load_samples
from .metrics_all import compute_metrics, json_ready
from .report import summary_lines, write_report
from .run_log import find_run_dir
from .sampling import sample_from_checkpoint, samples_path
from .sharded_features import gather_features, share_recogniser
from .sharding import ShardError, Shards
from .sharding import start as start_shards
from .sharding import stop as stop_shards


def run_evaluation(args) -> int:
    """The whole python -m cbdm_fast.evaluate for its checked flags, on this rank; the exit status
    (the same on every rank under torchrun; 130 when Ctrl-C or SIGTERM stopped it, at once)."""
    try:
        with sigterm_interrupts():
            return _evaluation(args)
    except KeyboardInterrupt as exc:
        if dist.from_env().is_main:
            print(f"interrupted{interrupt_reason(exc)}: the evaluation stopped before it finished", file=sys.stderr)
        return EXIT_INTERRUPTED


def _evaluation(args) -> int:
    start = time.perf_counter()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        if not dist.from_env().is_main:
            log = lambda msg: None  # noqa: E731  (rank 0 alone reports progress)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.write_ref_stats is not None:
            if dist.from_env().enabled:
                raise EvalError("--write-ref-stats runs in one process: start it without torchrun")
            return write_reference_stats(args, log)
        # every rank samples: under torchrun the job shards the images over the ranks in a process
        # group of its own, which it leaves before the evaluation joins one
        sampled = sample_from_checkpoint(args, log) if args.ckpt is not None else 0
        if sampled == EXIT_INTERRUPTED:  # the sampling job said what it kept
            return sampled
        shards, device = start_shards(resolve_device(args.device))
    except (ValueError, OSError) as exc:  # a --device no CLI checked (library callers), a bad torchrun environment
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        code = run(args, shards, device, log, start, sampled)
        return shards.agree_on_code(code)  # all ranks exit alike
    finally:
        stop_shards(shards)


def run(args, shards: Shards, device, log, start: float, sampled: int) -> int:
    """Evaluate (the samples of --ckpt once every rank sampled them), and on rank 0 write the outputs;
    this rank's exit status."""
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


def resolve_device(name: str):
    """dist.resolve_device, its error as an EvalError (exit 2 with the message)."""
    try:
        return dist.resolve_device(name)
    except ValueError as exc:
        raise EvalError(str(exc)) from None


def cache_folder(args):
    """Where the digits recogniser and the real features are cached (None: --no-cache)."""
    if args.no_cache:
        return None
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def build_extractors(args, device, cache_dir, log, shards: Shards):
    """(feature extractor, digits recogniser or None), the same on every rank."""
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


def evaluate(args, log, shards: Shards, device) -> dict | None:
    """Run the whole evaluation for parsed ``args``; the result dict on rank 0, None on the other
    ranks (raises EvalError, or ShardError under torchrun)."""
    cache_dir = cache_folder(args)
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
        log(f"downstream: training a classifier on the {n} generated images ({args.downstream_steps} steps)...")
        input_size = DIGITS_INPUT_SIZE if args.dataset == "digits" else size
        result["downstream"] = downstream_recognition(images, labels, test.images, test.labels, num_classes,
                                                      result["groups"], size=input_size,
                                                      steps=args.downstream_steps, seed=args.seed)
        result["downstream"]["test_set"] = "the reference's held-out test split" if test is ref else \
            ("the data set's test split" if not args.dataset.startswith("folder") else "the whole folder")
    return json_ready(result)


def fid_vs_stats(path, fake_feats, extractor) -> dict:
    """FID of the generated features against saved reference statistics (--fid-stats)."""
    try:
        mu_ref, sigma_ref = load_stats(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise EvalError(f"--fid-stats {path}: {exc}") from None
    if mu_ref.shape[0] != fake_feats.shape[1]:
        raise EvalError(f"--fid-stats {path} holds {mu_ref.shape[0]}-d statistics but the "
                        f"{extractor.kind} features are {fake_feats.shape[1]}-d")
    return {"fid_vs_stats": fid_from_stats(*feature_stats(fake_feats), mu_ref, sigma_ref),
            "fid_stats_file": str(path)}


def json_path(args, samples) -> Path:
    """Where the results go: --json, else <samples stem>.eval.json beside the samples."""
    samples = Path(samples)
    return Path(args.json) if args.json else samples.with_name(samples.stem + ".eval.json")


def write_outputs(args, result: dict) -> int:
    """The JSON file, the table on stdout and the --report folder."""
    out = json_path(args, args.samples)
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
        images, labels, meta = load_samples(args.samples)
        run_dir = find_run_dir(meta, args.run_dir)
        try:
            md = write_report(result, images, labels, args.report, run_dir=run_dir)
        except OSError as exc:
            print(f"error: cannot write the report in {args.report}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the report {md}")
    return 0


def write_reference_stats(args, log) -> int:
    """--write-ref-stats: mu and sigma of the reference images' features (the set --reference picks,
    features cached as evaluate caches them) in the pytorch-fid .npz layout; exit status."""
    size = args.image_size or NATIVE_SIZE.get(args.dataset)
    if size is None:
        raise EvalError(f"--write-ref-stats with --dataset {args.dataset} needs --image-size (the size the "
                        f"samples will have)")
    cache_dir = cache_folder(args)
    _, ref, _, ref_desc = load_real(args, size, NATIVE_CHANNELS.get(args.dataset, 3))
    extractor, _ = build_extractors(args, resolve_device(args.device), cache_dir, log, Shards())
    log(f"features of {len(ref)} real reference images: {ref_desc} ({extractor.description})...")
    feats, _ = extract(extractor, ref.images, cache_dir)
    mu, sigma = feature_stats(feats)
    out = save_stats(args.write_ref_stats, mu, sigma)
    print(f"wrote {out}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} of {len(ref)} images ({ref_desc}; "
          f"{extractor.description})")
    return 0
