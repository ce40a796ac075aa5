"""python -m cbdm_fast.sample: draw images from a trained model (ours or the CBDM authors' ckpt_*.pt).

Samplers (--sampler): ancestral DDPM over all T steps, as the authors sample (the default), or DDIM
over --steps evenly spaced timesteps (--eta 0: deterministic; 1: DDPM-like noise). Both with
classifier-free guidance (eps = eps_c + omega (eps_c - eps_u); no x0 clipping unless --clip-x0;
final clip to [-1, 1]).

Backends (--backend): fast (default): one forward of 2B per guided step (the unconditional half
through the label mask), the sampling step in the C++/CUDA extension, and on CUDA bf16 autocast
and the whole step captured once as a CUDA graph and replayed. reference: the authors' sampler
(fp32, two forwards per step, a Python loop).

Output: an .npz with
  images   uint8 (N, H, W, C), pixels = round((x + 1) * 127.5)
  labels   int64 (N,): the class of every image; all -1 for --method uncond (no label was used)
  omega    float64 scalar, the guidance strength used (0.0 unless --method cfg)
  method   str scalar (cfg | cond | uncond); also var_type, clip_x0, seed, which, ckpt, sampler,
           steps, eta and backend
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
  python -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt --num-samples 50000 --omega 1.6 \
      --sampler ddim --steps 100 --batch-size 256
  torchrun --standalone --nproc_per_node 4 -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt \
      --per-class 500 --omega 1.6 --batch-size 256
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .files.atomic import atomic_write

DEVICES = ("auto", "cpu", "cuda")
GRID_MAX = 10  # rows and columns of the PNG grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cbdm_fast.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a cbdm_fast checkpoint or the authors' ckpt_*.pt (required)")
    g.add_argument("--which", choices=("ema", "model"), default="ema",
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
    s.add_argument("--method", choices=("cfg", "cond", "uncond"), default="cfg",
                   help="classifier-free guidance, conditional only, or unconditional (default cfg)")
    s.add_argument("--omega", type=float, metavar="W", default=0.0,
                   help="guidance strength for --method cfg (default 0.0 = plain conditional). The authors "
                        "use DDPM 0.8, CBDM 1.6, CBDM+ADA 1.4, fine-tuned CBDM 2.0")
    s.add_argument("--var-type", choices=("fixedlarge", "fixedsmall"), default="fixedlarge",
                   help="reverse-process variance (default fixedlarge)")
    s.add_argument("--clip-x0", action="store_true",
                   help="clip the predicted x0 to [-1, 1] before the posterior mean (off by default: "
                        "the authors' sampler does not clip)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: ancestral sampling over all T steps (the authors'); ddim: --steps evenly "
                        "spaced timesteps (default ddpm)")
    s.add_argument("--steps", type=int, metavar="N",
                   help="DDIM steps (default 100, or T if T < 100); --sampler ddpm always runs all T steps")
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
    r.add_argument("--batch-size", type=int, metavar="B", default=64, help="images per batch (default 64)")
    r.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    r.add_argument("--device", default="auto", metavar="DEV",
                   help="auto | cpu | cuda | cuda:N (default auto; under torchrun a GPU rank uses cuda:LOCAL_RANK)")
    r.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's default; 1 helps tiny models on a busy CPU)")
    r.add_argument("--backend", choices=("fast", "reference", "auto", "extension"), default="fast",
                   metavar="{fast,reference}",
                   help="fast (default): one 2B forward per guided step, the extension's step, bf16 autocast "
                        "and CUDA-graph replay on CUDA; reference: the authors' sampler (fp32, two forwards "
                        "per step, Python loop). (auto and extension, the old names, mean fast with "
                        "--step-backend auto / extension)")
    r.add_argument("--step-backend", choices=("auto", "extension", "reference"), default=None,
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
    if args.per_class is not None:
        if args.per_class < 1:
            parser.error(f"--per-class must be >= 1, got {args.per_class}")
        if args.labels is not None:
            parser.error("--labels goes with --num-samples, not --per-class")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if not math.isfinite(args.omega) or args.omega < 0:
        parser.error(f"--omega must be a finite number >= 0, got {args.omega}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.eta is not None:
        if args.sampler != "ddim":
            parser.error(f"--eta applies to --sampler ddim only (got --eta {args.eta} with --sampler {args.sampler})")
        if not math.isfinite(args.eta) or args.eta < 0:
            parser.error(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.backend in ("auto", "extension"):  # the old names of the step backend
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
    if args.shard_size is not None and args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device not in DEVICES and not re.fullmatch(r"cuda:\d+", args.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    for flag, value, low in (("--ch", args.ch, 1), ("--num-res-blocks", args.num_res_blocks, 1),
                             ("--num-class", args.num_class, 1), ("--in-ch", args.in_ch, 1),
                             ("--image-size", args.image_size, 1), ("--T", args.T, 2)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.ch_mult is not None and any(m < 1 for m in args.ch_mult):
        parser.error(f"--ch-mult values must be >= 1, got {args.ch_mult}")
    if args.attn is not None and any(v < 0 for v in args.attn):
        parser.error(f"--attn levels must be >= 0, got {args.attn}")


def model_overrides(args: argparse.Namespace) -> dict:
    """The model flags given on the command line, as load_model's model_kwargs."""
    names = ("ch", "ch_mult", "attn", "num_res_blocks", "num_class", "in_ch", "T", "image_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def grid_indices(labels: np.ndarray, per_class, num_class: int, conditional: bool):
    """(indices into the samples, images per row) of the PNG grid (see the module docstring)."""
    n = len(labels)
    if per_class is not None and conditional:
        classes = np.unique(np.round(np.linspace(0, num_class - 1, min(num_class, GRID_MAX))).astype(int))
        cols = min(per_class, GRID_MAX)
        return [c * per_class + j for c in classes for j in range(cols)], cols
    first = np.arange(min(n, GRID_MAX * GRID_MAX))
    if conditional:
        first = first[np.argsort(labels[first], kind="stable")]
    return first.tolist(), min(n, GRID_MAX)


def save_npz_atomic(path: Path, **arrays) -> Path:
    """np.savez through a temporary file, fsync and rename (see cbdm_fast.files.atomic)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


class SampleError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2, no traceback."""


# Under torchrun the ranks that finish their shards first wait for the slowest one at the final
# gather, which can last as long as sampling a few shards (or a whole resumed run on an idle rank).
# A rank that fails reports through that gather or exits (and torchrun then stops the others), so
# this timeout only bounds a rank that is stuck.
WAIT_TIMEOUT_S = 24 * 3600.0


def _rank_tag(ctx) -> str:
    return f"[rank {ctx.rank}] " if ctx is not None and ctx.enabled and not ctx.is_main else ""


def _error(msg: str, ctx=None) -> int:
    """Print ``error: msg`` (prefixed with the rank on ranks other than 0); the exit status 2."""
    print(f"{_rank_tag(ctx)}error: {msg}", file=sys.stderr, flush=True)
    return 2


def _quiet(*args, **kwargs) -> None:
    """print for ranks other than 0: under torchrun only rank 0 reports."""


def default_shard_size(batch_size: int) -> int:
    """A multiple of the batch size near 2048 images (at least one batch)."""
    return batch_size * max(1, round(2048 / batch_size))


def run_key(args, info, model, omega, steps, eta, n, shard_size, digest) -> dict:
    """Everything that changes the images of a run, keyed by the flag to name when it differs."""
    return {"--ckpt (its weights)": digest, "--which": args.which, "model": info["unet"],
            "--image-size": info["image_size"] or 32, "--T": model.config["T"],
            "beta": [info["beta_1"], info["beta_T"]], "--method": args.method, "--omega": omega,
            "--var-type": args.var_type, "--clip-x0": bool(args.clip_x0), "--sampler": args.sampler,
            "--steps": steps, "--eta": eta, "--seed": args.seed, "--per-class": args.per_class,
            "--num-samples": None if args.per_class is not None else n, "--labels": args.labels,
            "--backend": args.backend, "--no-amp": bool(args.no_amp), "--patch-model": bool(args.patch_model),
            "--shard-size": shard_size}


@dataclass
class Job:
    """What one run samples and where it goes (worked out identically on every rank)."""
    model: object
    info: dict
    device: object
    sampler: object         # set by build_sampler
    labels: object          # torch int64 (n,): every image's label, -1 for uncond
    n: int
    omega: float
    steps: int
    eta: float
    size: int
    in_ch: int
    num_class: int
    out: Path
    grid: Path
    run: object             # the ShardRun (not opened yet)


def sampling_steps(args, T: int) -> tuple:
    """(steps, eta) of the sampler; SampleError for a --steps this model cannot run."""
    if args.sampler == "ddpm":
        if args.steps is not None and args.steps != T:
            raise SampleError(f"--steps {args.steps}: --sampler ddpm always runs all T = {T} steps of this "
                              f"model; use --sampler ddim for fewer steps (or drop --steps)")
        return T, 0.0
    steps = args.steps if args.steps is not None else min(100, T)
    if steps > T:
        raise SampleError(f"--steps {steps}: at most T = {T} steps for this model")
    return steps, 0.0 if args.eta is None else args.eta


def run_labels(args, n_class: int):
    """(n, labels): class-balanced, i.i.d. uniform from --seed, or none (-1) for uncond."""
    import torch

    from .samplers import class_balanced_labels, uniform_labels

    if args.per_class is not None:
        n = args.per_class * n_class
        labels = class_balanced_labels(args.per_class, n_class)
    else:
        n = args.num_samples
        labels = uniform_labels(n, n_class, generator=torch.Generator().manual_seed(args.seed))
    if args.method == "uncond":
        labels = torch.full((n,), -1, dtype=torch.int64)
    return n, labels.to(torch.int64)


def output_paths(args, ckpt: Path, omega: float, n: int) -> tuple:
    """(out, grid) with their folders created; SampleError when they cannot be written."""
    out = Path(args.out) if args.out else ckpt.parent / f"samples_{args.method}_w{omega:g}_{n}.npz"
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    try:
        for p in (out, grid):
            p.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(p.parent, os.W_OK):
                raise SampleError(f"cannot write to {p.parent}")
    except OSError as exc:
        raise SampleError(f"cannot create the output folder: {exc}") from None
    return out, grid


def prepare(args, device, say) -> Job:
    """Load the model (on the CPU) and work out the run: labels, paths and shard plan. SampleError on a
    user error. Every rank does the same (the same files and arguments), before any shard is touched."""
    from . import ops
    from .files.checkpoint import load_model
    from .sampling_shards import ShardRun, shards_folder, weights_digest

    try:
        if args.step_backend == "extension" and not ops.extension_available():
            from .ops import _extension
            raise SampleError(f"--step-backend extension: {_extension.unavailable_reason()}")
        model, info = load_model(args.ckpt, which=args.which, flagfile=args.flagfile,
                                 model_kwargs=model_overrides(args))
    except ValueError as exc:  # CheckpointError (a ValueError)
        raise SampleError(str(exc)) from None

    if args.method != "uncond" and model.label_embedding is None:
        raise SampleError(f"--method {args.method} needs a class-conditional model, but this checkpoint's model "
                          f"is unconditional (no label embedding): use --method uncond")
    omega = args.omega
    if args.method != "cfg" and omega != 0:
        say(f"note: --omega applies to --method cfg only; sampling with --method {args.method} "
            f"(recorded as omega 0)", file=sys.stderr)
        omega = 0.0
    num_class, in_ch, T = model.num_class, model.in_ch, model.config["T"]
    steps, eta = sampling_steps(args, T)
    size = info["image_size"] or 32
    down = 2 ** (len(model.config["ch_mult"]) - 1)
    if size % down:
        raise SampleError(f"image size {size} is not a multiple of {down} (the UNet downsamples "
                          f"{len(model.config['ch_mult']) - 1} times): check --image-size")
    n, labels = run_labels(args, num_class)
    out, grid = output_paths(args, Path(args.ckpt), omega, n)

    shard_size = args.shard_size or default_shard_size(args.batch_size)
    key = run_key(args, info, model, omega, steps, eta, n, shard_size, weights_digest(model.state_dict()))
    run = ShardRun(shards_folder(out), key, n, shard_size, (size, size, in_ch))
    return Job(model, info, device, None, labels, n, omega, steps, eta, size, in_ch, num_class, out, grid, run)


def build_sampler(job: Job, args):
    """The model on its device and the sampler (after the shard folder is checked, as it takes a while
    on a GPU); SampleError for a sampler option this model or device cannot run."""
    from .samplers import make_sampler
    from .schedule import Schedule

    job.model = job.model.to(job.device)
    T = job.model.config["T"]
    schedule = Schedule(T, job.info["beta_1"], job.info["beta_T"], device=job.device)
    kwargs = dict(seed=args.seed, sampler=args.sampler, steps=job.steps if args.sampler == "ddim" else None,
                  eta=job.eta, omega=job.omega, method=args.method, var_type=args.var_type, clip_x0=args.clip_x0)
    if args.backend == "fast":
        kwargs.update(amp=False if args.no_amp else None, cuda_graph=False if args.no_cuda_graph else None,
                      channels_last=args.channels_last, step_backend=args.step_backend or "auto",
                      patch=args.patch_model, compile=args.compile)
    try:
        return make_sampler(args.backend, job.model, schedule, (job.in_ch, job.size, job.size), **kwargs)
    except ValueError as exc:
        raise SampleError(str(exc)) from None


# ------------------------------------------------------------------------------ ranks
def agree(error: Optional[str]) -> None:
    """Collective (every rank calls it): SampleError on EVERY rank when any rank has an error, with the
    first failing rank's message (rank 0 prints it), so no rank goes on to wait for one that gave up.
    In one process: SampleError(error) when error is not None."""
    from . import dist

    for rank, e in enumerate(dist.all_gather_object(error)):
        if e is not None:
            raise SampleError(e if rank == 0 else f"[rank {rank}] {e}")


def agreed(step, *args):
    """``step(*args)`` on every rank, then ``agree`` on its SampleError: returns its result on every
    rank, or raises SampleError on every rank when it failed on any."""
    result, error = None, None
    try:
        result = step(*args)
    except SampleError as exc:
        error = str(exc)
    agree(error)
    return result


def open_shards(run, ctx) -> list:
    """Rank 0 creates or checks the shard folder and its manifest, then tells every rank the pending
    shards (or its error). Collective; SampleError on every rank on a mismatch."""
    from . import dist
    from .sampling_shards import ShardMismatch

    result = None
    if ctx.is_main:
        try:
            result = run.open()
        except ShardMismatch as exc:
            result = str(exc)
        except OSError as exc:
            result = f"cannot create the shard folder {run.folder}: {exc}"
    result = dist.broadcast_object(result)
    if isinstance(result, str):
        raise SampleError(result)
    # every rank writes its shards there, so it must see the folder rank 0 made (multi-node: shared storage)
    agree(None if run.has_manifest() else
          f"cannot see {run.manifest_path()}, which rank 0 wrote: --out must be on a filesystem that every "
          f"rank (every node) shares")
    return result


def my_shards(pending: list, ctx) -> list:
    """This rank's share of the pending shards: every world_size-th one, starting at its rank. Any
    assignment gives the same images (noise depends on the global index only); this one is fixed and
    balanced also when resuming with other ranks."""
    return pending[ctx.rank::ctx.world_size]


class Progress:
    """tqdm over img-steps (this rank's own shards; disabled on other ranks), with a samples/s rate."""

    def __init__(self, images: int, steps: int, disable: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=images * steps, unit="img-step", file=sys.stderr, dynamic_ncols=True,
                        disable=disable, desc=desc)
        self.steps, self.done, self.shown = steps, 0.0, 0.0
        self.start = time.perf_counter()

    def batch(self, batch_size: int):
        """The per-step callback of one batch."""
        def progress(step):
            self.done += batch_size / self.steps
            self.bar.update(batch_size)
            now = time.perf_counter()
            if now - self.shown > 0.5:
                self.shown = now
                self.bar.set_postfix(samples_s=f"{self.done / max(now - self.start, 1e-9):.2f}", refresh=False)
        return progress

    def close(self) -> None:
        self.bar.close()


def sample_shards(job: Job, shards: list, batch_size: int, method: str, progress: Progress) -> None:
    """Sample the given shards, in batches of batch_size from each shard's start, and write each one."""
    import torch

    from .files.images import to_uint8

    for i in shards:
        lo, hi = job.run.shards[i]
        shard = np.empty((hi - lo, job.size, job.size, job.in_ch), dtype=np.uint8)
        for first in range(lo, hi, batch_size):
            b = min(batch_size, hi - first)
            index = torch.arange(first, first + b)
            y = None if method == "uncond" else job.labels[first:first + b]
            x_0 = job.sampler(y, index, progress=progress.batch(b))
            shard[first - lo:first - lo + b] = to_uint8(x_0)
        write_shard(job.run, i, shard, job.labels[lo:hi].numpy())


def sampling_error(job: Job, shards: list, args, ctx, progress: Progress) -> Optional[str]:
    """Sample this rank's shards; None, or the message of a user-facing error (printed at once on ranks
    other than 0, whose errors rank 0 reports only once every rank is done). KeyboardInterrupt goes up."""
    import torch

    try:
        sample_shards(job, shards, args.batch_size, args.method, progress)
        return None
    except torch.cuda.OutOfMemoryError:
        error = f"out of GPU memory at --batch-size {args.batch_size}: use a smaller --batch-size"
    except OSError as exc:
        error = f"cannot write a shard into {job.run.folder}: {exc}"
    finally:
        progress.close()
    if not ctx.is_main:
        _error(error, ctx)
    return error


def write_outputs(job: Job, args) -> None:
    """Merge the shards in global index order; write the .npz and the PNG grid (rank 0)."""
    from .files.images import make_grid, save_png

    try:
        images, labels_np = job.run.merge()
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    if not np.array_equal(labels_np, job.labels.numpy()):
        raise SampleError(f"the shards in {job.run.folder} hold other labels than this run's: delete the folder "
                          f"and run again")
    try:
        save_npz_atomic(job.out, images=images, labels=labels_np, omega=np.float64(job.omega),
                        method=np.str_(args.method), var_type=np.str_(args.var_type),
                        clip_x0=np.bool_(args.clip_x0), seed=np.int64(args.seed), which=np.str_(args.which),
                        ckpt=np.str_(str(Path(args.ckpt))), sampler=np.str_(args.sampler),
                        steps=np.int64(job.steps), eta=np.float64(job.eta), backend=np.str_(args.backend))
        idx, nrow = grid_indices(labels_np, args.per_class, job.num_class, args.method != "uncond")
        save_png(make_grid(images[idx], nrow), job.grid, upscale=max(1, 32 // job.size))
    except OSError as exc:
        raise SampleError(f"cannot write the output: {exc}") from None


def describe(job: Job, args, ctx, pending: list, say) -> None:
    from .model import count_parameters

    info, T = job.info, job.model.config["T"]
    say(f"model: UNet {count_parameters(job.model) / 1e6:.2f}M parameters ({args.which} weights), configured "
        f"from {info['source']}; {job.num_class} classes, {job.in_ch}x{job.size}x{job.size}, T={T}", flush=True)
    sampler_text = (f"ddpm ({T} steps, var {args.var_type})" if args.sampler == "ddpm"
                    else f"ddim ({job.steps} steps, eta {job.eta:g})")
    device = f"{ctx.world_size} ranks on {job.device.type}" if ctx.enabled else f"device {job.device}"
    say(f"sampling {job.n} images: {sampler_text}, method {args.method}, omega {job.omega:g}, clip_x0 "
        f"{args.clip_x0}, seed {args.seed}, batch {args.batch_size}, backend {args.backend}, {device}", flush=True)
    done = len(job.run.shards) - len(pending)
    if done:
        say(f"resuming: {done} of {len(job.run.shards)} shards already in {job.run.folder}", flush=True)
    if ctx.enabled:
        say(f"data parallel: {len(pending)} shards to sample over {ctx.world_size} ranks (rank r samples the "
            f"pending shards r, r + {ctx.world_size}, ...); the progress bar shows rank 0's own", flush=True)


def images_in(run, shards: list) -> int:
    return sum(run.shards[i][1] - run.shards[i][0] for i in shards)


def run_sampling(args, ctx) -> int:
    """The run on this rank (the whole run in one process). Returns the exit status."""
    from . import dist
    from .dist import resolve_device

    say = print if ctx.is_main else _quiet
    # before the process group: each rank checks its own device (a bad --device fails alike everywhere)
    try:
        ctx, device = dist.setup(resolve_device(args.device), timeout_s=WAIT_TIMEOUT_S)
    except ValueError as exc:
        return _error(str(exc), ctx)
    try:
        job = agreed(prepare, args, device, say)  # a bad checkpoint or flag on any rank stops every rank
        pending = open_shards(job.run, ctx)
        job.sampler = agreed(build_sampler, job, args)
    except SampleError as exc:  # raised on every rank alike (agreed); rank 0 says why
        return _error(str(exc)) if ctx.is_main else 2

    describe(job, args, ctx, pending, say)
    mine = my_shards(pending, ctx)
    progress = Progress(images_in(job.run, mine), job.steps, args.no_progress or not ctx.is_main,
                        "sampling" + (" (rank 0)" if ctx.enabled else ""))
    try:
        error = sampling_error(job, mine, args, ctx, progress)
    except KeyboardInterrupt:
        if ctx.is_main:
            left = len([i for i in pending if not job.run.complete(i)])
            again = ("the same torchrun command again (with any number of ranks)" if ctx.enabled
                     else "the same command again")
            print(f"interrupted: {len(job.run.shards) - left} of {len(job.run.shards)} shards are in "
                  f"{job.run.folder}; run {again} to resume", file=sys.stderr)
        return 130
    if not ctx.enabled and error is not None:
        return _error(error)
    errors = dist.all_gather_object(error)  # also the barrier before the merge
    elapsed = time.perf_counter() - progress.start
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        if ctx.is_main:
            detail = errors[0] if failed[0] == 0 else f"sampling failed on rank {failed[0]} (its message is above)"
            _error(f"{detail}; the finished shards are kept in {job.run.folder}: run the same command again "
                   f"to resume")
        return 2
    if not ctx.is_main:
        return 0
    try:
        write_outputs(job, args)
    except SampleError as exc:
        return _error(str(exc))
    if not args.keep_shards:
        job.run.remove()
    sampled = images_in(job.run, pending)
    rate = f"{sampled / elapsed:.2f} samples/s" if sampled and elapsed > 0 else "nothing left to sample"
    print(f"wrote {job.n} images to {job.out} and the grid {job.grid} ({elapsed:.1f} s, {rate})", flush=True)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    import torch

    from . import dist

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        ctx = dist.from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else one process
    except ValueError as exc:
        return _error(str(exc))
    try:
        code = run_sampling(args, ctx)
        if ctx.enabled and code == 0:
            # leave together: a rank that tore its gloo group down while rank 0 was still merging the shards
            # was seen to abort at exit now and then (SIGABRT in gloo's teardown)
            dist.barrier()
        return code
    finally:
        dist.cleanup()


def write_shard(run, i, images, labels):
    """One finished shard, written atomically (a seam the resume tests interrupt)."""
    return run.write(i, images, labels)


if __name__ == "__main__":
    sys.exit(main())
