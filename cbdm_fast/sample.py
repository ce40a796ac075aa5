"""python -m cbdm_fast.sample: draw images from a trained model (ours or the CBDM authors' ckpt_*.pt).

Samplers (--sampler): ancestral DDPM over all T steps, as the authors sample (the default), DDIM over
--steps evenly spaced timesteps (--eta 0: deterministic; 1: DDPM-like noise), or DPM-Solver++(2M) in
--steps model evaluations (default 20) on a grid uniform in time or log-SNR (--schedule). All with
classifier-free guidance (eps = eps_c + omega (eps_c - eps_u)), no x0 clipping unless --clip-x0, and a
final clip to [-1, 1].

Backends (--backend): fast (default): one forward of 2B per guided step (the unconditional half
through the label mask), the sampling step in the C++/CUDA extension, and on CUDA bf16 autocast
and the whole step captured once as a CUDA graph and replayed. reference: the authors' sampler
(fp32, two forwards per step, a Python loop).

Output: an .npz with
  images   uint8 (N, H, W, C), pixels = round((x + 1) * 127.5)
  labels   int64 (N,): the class of every image; all -1 for --method uncond (no label was used)
  omega    float64 scalar, the guidance strength used (0.0 unless --method cfg)
  method   str scalar (cfg | cond | uncond); also var_type, clip_x0, seed, which, ckpt, sampler,
           steps, eta and backend (and schedule for dpm++2m)
and a PNG grid next to it: with --per-class one row per class (head class 0 first), at most 10 rows
(for more than 10 classes, 10 classes evenly spaced from head to tail) of at most 10 images; with
--num-samples the first 100 images, sorted by label, 10 per row. Images under 32 pixels are upscaled.

Reproducibility: sample i's x_T and the noise of each of its steps are a function of (--seed, i)
only (counter-based noise, cbdm_fast.samplers.CounterNoise), so the same --seed gives the same
images whatever --batch-size, and the same images (to float rounding) on either backend. The
uniform labels come from a CPU generator seeded with --seed.

Resuming: images are written in shards (--shard-size images each) into <out stem>.shards/ beside
--out, with a manifest. A killed run, restarted with the same arguments, skips the finished shards
and yields exactly the same images; other arguments are an error naming the flags that differ.
After the merged .npz is written the shard folder is removed (unless --keep-shards).

Several processes (torchrun; RANK / WORLD_SIZE / LOCAL_RANK in the environment): each rank samples its
share of the shards and rank 0 merges them, so the output is the single-process output (on a CPU, bit
for bit; the images do not depend on which rank drew them). Rank 0 opens (or checks) the shard folder,
then rank r samples the r-th, (r + N)-th, ... pending shards on cuda:LOCAL_RANK (NCCL; gloo on a CPU);
after all ranks are done rank 0 merges the shards in global index order and writes the .npz and the
grid. A user error found by any rank before sampling (checkpoint, flags, a shard folder of another
run) stops every rank with exit status 2 and one message from rank 0; an error while sampling is
printed by its rank ("[rank r] error: ...") and stops the run once the others have written their
shards. A killed run resumes with the same command on any number of ranks, one included. Only rank 0
prints, and its progress bar counts its own shards. --out must be on storage all ranks share.

Examples:
  python -m cbdm_fast.sample --ckpt runs/digits_cbdm/ckpt_3000.pt --per-class 10 --omega 1.0
  python -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt --num-samples 50000 --omega 1.6
  python -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt --num-samples 50000 --omega 1.6 \\
      --sampler dpm++2m --steps 20 --batch-size 256
  torchrun --standalone --nproc_per_node 4 -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt \\
      --per-class 500 --omega 1.6 --batch-size 256
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from .dist import resolve_device
from .flags import require_at_least
from .ops.ddpm_step import BACKENDS as STEP_BACKENDS  # the step ops' backends (ddim_step's and dpm_step's are the same)
from .samplers import GUIDANCE, SAMPLE_BACKENDS, SAMPLERS, SPACINGS
from .sampling import SampleRequest, run_sampling
from .schedule import VAR_TYPES

OLD_BACKENDS = ("auto", "extension")  # --backend's old names: --backend fast with that --step-backend
DEFAULT = SampleRequest  # the flags' defaults are the request's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cbdm_fast.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a cbdm_fast checkpoint or the authors' ckpt_*.pt (required)")
    g.add_argument("--which", choices=("ema", "model"), default=DEFAULT.which,
                   help="EMA weights or the raw trained weights (default ema)")

    a = parser.add_argument_group(
        "model configuration (authors' checkpoints)",
        "the authors' ckpt_*.pt files store no model configuration: it comes from --flagfile, or from "
        "these flags on top of the authors' defaults (cond/augm and the class count are read off the "
        "weights). Given with a flagfile or one of our checkpoints, these flags override it.")
    a.add_argument("--flagfile", metavar="PATH",
                   help="their flagfile.txt (default: flagfile.txt next to --ckpt, if present)")
    a.add_argument("--ch", type=int, metavar="C", help="base channels (authors' default 128)")
    a.add_argument("--ch-mult", type=int, nargs="+", metavar="M", help="channel multipliers (default 1 2 2 2)")
    a.add_argument("--attn", type=int, nargs="*", metavar="L", help="levels with attention (default 1)")
    a.add_argument("--num-res-blocks", type=int, metavar="N", help="ResBlocks per level (default 2)")
    a.add_argument("--num-class", type=int, metavar="C", help="classes (default: from the label embedding's weights)")
    a.add_argument("--in-ch", type=int, metavar="C", help="image channels (default 3)")
    a.add_argument("--image-size", type=int, metavar="S", help="image height and width (default: recorded, else 32)")
    a.add_argument("--T", type=int, metavar="T", help="diffusion steps (default 1000)")

    s = parser.add_argument_group("sampling")
    s.add_argument("--method", choices=GUIDANCE, default=DEFAULT.method,
                   help="classifier-free guidance, conditional only, or unconditional (default cfg)")
    s.add_argument("--omega", type=float, metavar="W", default=DEFAULT.omega,
                   help="guidance strength for --method cfg (default 0.0 = plain conditional). The authors "
                        "use DDPM 0.8, CBDM 1.6, CBDM+ADA 1.4, fine-tuned CBDM 2.0")
    s.add_argument("--var-type", choices=VAR_TYPES, default=DEFAULT.var_type,
                   help="reverse-process variance (default fixedlarge)")
    s.add_argument("--clip-x0", action="store_true",
                   help="clip the predicted x0 to [-1, 1] before the posterior mean (off by default: "
                        "the authors' sampler does not clip)")
    s.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT.sampler,
                   help="ddpm: ancestral sampling over all T steps (the authors'); ddim: --steps evenly "
                        "spaced timesteps; dpm++2m: DPM-Solver++(2M) in --steps model evaluations (default ddpm)")
    s.add_argument("--steps", type=int, metavar="N",
                   help="DDIM steps (default 100, or T if T < 100), DPM-Solver++ steps (default 20, at most T-1; "
                        "--schedule logsnr allows fewer: 37 for T = 1000); --sampler ddpm always runs all T steps")
    s.add_argument("--schedule", choices=SPACINGS,
                   help="--sampler dpm++2m: grid points uniform in time or in log-SNR (default: logsnr when its "
                        "grid holds --steps, else time)")
    s.add_argument("--eta", type=float, metavar="E",
                   help="DDIM noise: 0 deterministic (default), 1 DDPM-like; --sampler ddim only")

    lab = parser.add_argument_group("labels (give exactly one of --per-class, --num-samples)")
    lab.add_argument("--per-class", type=int, metavar="N",
                     help="exactly N images of every class, in class order 0..C-1 (with --method uncond: "
                          "N x C images, labels -1)")
    lab.add_argument("--num-samples", type=int, metavar="N", help="N images with --labels")
    lab.add_argument("--labels", choices=("uniform",),
                     help="with --num-samples: i.i.d. uniform labels, the authors' evaluation protocol (default)")

    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=int, metavar="B", default=DEFAULT.batch_size,
                   help="images per batch (default 64)")
    r.add_argument("--seed", type=int, metavar="S", default=DEFAULT.seed, help="random seed (default 0)")
    r.add_argument("--device", default=DEFAULT.device, metavar="DEV",
                   help="auto | cpu | cuda | cuda:N (default auto; under torchrun a GPU rank uses cuda:LOCAL_RANK)")
    r.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's default; 1 helps tiny models on a busy CPU)")
    r.add_argument("--backend", choices=SAMPLE_BACKENDS + OLD_BACKENDS, default=DEFAULT.backend,
                   metavar="{fast,reference}",
                   help="fast (default): one 2B forward per guided step, the extension's step, bf16 autocast "
                        "and CUDA-graph replay on CUDA; reference: the authors' sampler (fp32, two forwards "
                        "per step, Python loop). (auto and extension, the old names, mean fast with "
                        "--step-backend auto / extension)")
    r.add_argument("--step-backend", choices=STEP_BACKENDS, default=None,
                   help="--backend fast: backend of the step op ops.ddpm_step / ops.ddim_step (default auto)")
    r.add_argument("--no-amp", action="store_true", help="--backend fast: no bf16 autocast on CUDA (fp32)")
    r.add_argument("--no-cuda-graph", action="store_true",
                   help="--backend fast: run the steps eagerly instead of replaying a CUDA graph")
    r.add_argument("--channels-last", action="store_true",
                   help="--backend fast: channels_last activations for the convolutions")
    r.add_argument("--patch-model", action="store_true",
                   help="--backend fast: swap in the fused modules of cbdm_fast.nn (GroupNorm+SiLU, attention)")
    r.add_argument("--compile", action="store_true",
                   help="--backend fast: the UNet under torch.compile (compiles for a minute or two first; "
                        "pays off for large sample counts on a GPU)")
    r.add_argument("--shard-size", type=int, metavar="N",
                   help="images per shard of the resumable run (default: a multiple of --batch-size near 2048)")
    r.add_argument("--keep-shards", action="store_true", help="keep the shard folder after merging")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="PATH.npz",
                   help="samples file (default: next to --ckpt, samples_<method>_w<omega>_<n>.npz)")
    o.add_argument("--grid", metavar="PATH.png", help="PNG grid (default: --out with .png)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range and consistency checks (argparse errors: usage + message, exit 2)."""
    if (args.per_class is None) == (args.num_samples is None):
        parser.error("give exactly one of --per-class N and --num-samples N"
                     + (" (not both)" if args.per_class is not None else ""))
    if args.per_class is not None and args.labels is not None:
        parser.error("--labels goes with --num-samples, not --per-class")
    require_at_least(parser, ("--per-class", args.per_class, 1), ("--num-samples", args.num_samples, 1),
                     ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                     ("--shard-size", args.shard_size, 1), ("--threads", args.threads, 1), ("--ch", args.ch, 1),
                     ("--num-res-blocks", args.num_res_blocks, 1), ("--num-class", args.num_class, 1),
                     ("--in-ch", args.in_ch, 1), ("--image-size", args.image_size, 1), ("--T", args.T, 2))
    if not math.isfinite(args.omega) or args.omega < 0:
        parser.error(f"--omega must be a finite number >= 0, got {args.omega}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.schedule is not None and args.sampler != "dpm++2m":
        parser.error(f"--schedule applies to --sampler dpm++2m only (got --schedule {args.schedule} with "
                     f"--sampler {args.sampler})")
    if args.eta is not None:
        if args.sampler != "ddim":
            parser.error(f"--eta applies to --sampler ddim only (got --eta {args.eta} with --sampler {args.sampler})")
        if not 0 <= args.eta <= 1:  # DDIM's sigma is defined for 0 <= eta <= 1 (ops/ddim_step.py)
            parser.error(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {args.eta}")
    if args.backend in OLD_BACKENDS:
        if args.step_backend is not None and args.step_backend != args.backend:
            parser.error(f"--backend {args.backend} (an old name of --backend fast --step-backend {args.backend}) "
                         f"contradicts --step-backend {args.step_backend}")
        args.step_backend, args.backend = args.backend, "fast"
    if args.backend == "reference":
        for flag, given in (("--step-backend", args.step_backend is not None), ("--no-amp", args.no_amp),
                            ("--no-cuda-graph", args.no_cuda_graph), ("--channels-last", args.channels_last),
                            ("--patch-model", args.patch_model), ("--compile", args.compile)):
            if given:
                parser.error(f"{flag} applies to --backend fast only (the reference backend is the authors' "
                             f"fp32 sampler)")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.ch_mult is not None and any(m < 1 for m in args.ch_mult):
        parser.error(f"--ch-mult values must be >= 1, got {args.ch_mult}")
    if args.attn is not None and any(v < 0 for v in args.attn):
        parser.error(f"--attn levels must be >= 0, got {args.attn}")


def model_overrides(args: argparse.Namespace) -> dict:
    """The model flags given on the command line, as load_model's model_kwargs."""
    names = ("ch", "ch_mult", "attn", "num_res_blocks", "num_class", "in_ch", "T", "image_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def sample_request(args: argparse.Namespace) -> SampleRequest:
    """The sampling job the checked flags describe."""
    return SampleRequest(
        ckpt=args.ckpt, which=args.which, flagfile=args.flagfile, model_kwargs=model_overrides(args),
        method=args.method, omega=args.omega, var_type=args.var_type, clip_x0=args.clip_x0, sampler=args.sampler,
        steps=args.steps, eta=args.eta, spacing=args.schedule, per_class=args.per_class,
        num_samples=args.num_samples, labels=args.labels,
        batch_size=args.batch_size, seed=args.seed, device=args.device, backend=args.backend,
        step_backend=args.step_backend, amp=not args.no_amp, cuda_graph=not args.no_cuda_graph,
        channels_last=args.channels_last, patch_model=args.patch_model, compile=args.compile,
        shard_size=args.shard_size, keep_shards=args.keep_shards, progress=not args.no_progress,
        out=args.out, grid=args.grid)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_sampling(sample_request(args))


if __name__ == "__main__":
    sys.exit(main())
