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

Sampling first (--ckpt instead of --samples): a sampling job (cbdm_fast.sampling, the library behind
python -m cbdm_fast.sample) runs in this process with --per-class N or --num-samples N, --method,
--omega, --sampler, --steps, --sample-batch-size and evaluate's --seed, --device, --threads; the .npz
goes beside the checkpoint (or --samples-out), then it is evaluated exactly as with --samples. A failed
sampling exits 2 after the sampler's message.

Several processes (torchrun): every rank extracts the features (and recogniser outputs) of its
contiguous slice of the generated images, and of the real images unless their features are cached;
rank 0 gathers them once, in rank order, computes the metrics, writes every file (the feature cache
included) and prints everything, errors of any rank included; all ranks exit with the same status.
With --ckpt the sampling job shards the sampling over the ranks too (as python -m cbdm_fast.sample
does under torchrun, in its own process group), then the evaluation joins one. See
evaluation/sharding.py and evaluation/pipeline.py.

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
import sys
from pathlib import Path

from .data.registry import DATASETS
from .dist import resolve_device
from .evaluation.pipeline import json_path, run_evaluation
from .evaluation.sampling import add_sampling_args, check_sampling_args, samples_path
from .files.paths import check_output_file, check_output_folder
from .flags import require_at_least


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
    require_at_least(parser, ("--k", args.k, 1), ("--is-splits", args.is_splits, 1),
                     ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                     ("--prd-runs", args.prd_runs, 0), ("--downstream-steps", args.downstream_steps, 1),
                     ("--batch-size", args.batch_size, 1), ("--groups-few", args.groups_few, 0))
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        parser.error(f"--run-dir {args.run_dir} is not a folder")
    if args.groups_few > args.groups_many:
        parser.error(f"--groups-few ({args.groups_few}) must not exceed --groups-many ({args.groups_many})")
    require_at_least(parser, ("--prd-clusters", args.prd_clusters, 1), ("--image-size", args.image_size, 4),
                     ("--threads", args.threads, 1))
    if args.dataset == "digits" and args.data_root is not None:
        parser.error("--data-root is not used by --dataset digits (it is built in)")
    if args.features == "digits" and args.dataset != "digits":
        parser.error(f"--features digits is the digits recogniser: only for --dataset digits, not {args.dataset}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    check_sampling_args(parser, args)
    try:
        resolve_device(args.device)
        check_outputs(args)
    except ValueError as exc:  # PathError too
        parser.error(str(exc))


def check_outputs(args) -> None:
    """Every file and folder evaluate writes, before any work: not a folder where a file goes (nor a file
    where a folder goes), and writable (PathError naming the flag)."""
    if args.write_ref_stats is not None:
        check_output_file(args.write_ref_stats, "--write-ref-stats", "ref_stats.npz")
        return
    samples = Path(args.samples) if args.samples is not None else samples_path(args)
    if args.ckpt is not None:
        check_output_file(samples, "--samples-out", "samples.npz")
    check_output_file(json_path(args, samples), "--json" if args.json else "--json (default beside the samples)", "eval.json")
    for flag, folder in (("--report", args.report), ("--cache-dir", args.cache_dir)):
        if folder is not None:
            check_output_folder(folder, flag)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run_evaluation(args)


if __name__ == "__main__":
    sys.exit(main())
