"""python -m cbdm_fast.sample: draw images from a trained model (ours or the CBDM authors' ckpt_*.pt).

Ancestral DDPM over all T steps with classifier-free guidance, as the authors sample
(eps = eps_c + omega (eps_c - eps_u); no x0 clipping unless --clip-x0; final clip to [-1, 1]).

Output: an .npz with
  images   uint8 (N, H, W, C), pixels = round((x + 1) * 127.5)
  labels   int64 (N,): the class of every image; all -1 for --method uncond (no label was used)
  omega    float64 scalar, the guidance strength used (0.0 unless --method cfg)
  method   str scalar (cfg | cond | uncond); also var_type, clip_x0, seed, which and ckpt
and a PNG grid next to it: with --per-class one row per class (head class 0 first), at most 10 rows
(for more than 10 classes, 10 classes evenly spaced from head to tail) of at most 10 images; with
--num-samples the first 100 images, sorted by label, 10 per row. Images under 32 pixels are upscaled.

The same --seed gives the same images (and labels) for the same checkpoint, --batch-size and device:
x_T and the noise of every step come from one torch.Generator seeded with --seed; the uniform
labels from a CPU generator seeded with --seed.

Examples:
  python -m cbdm_fast.sample --ckpt runs/digits_cbdm/ckpt_3000.pt --per-class 10 --omega 1.0
  python -m cbdm_fast.sample --ckpt logs/cifar100lt_cbdm/ckpt.pt --num-samples 50000 --omega 1.6
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_write

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
    r.add_argument("--device", default="auto", metavar="DEV", help="auto | cpu | cuda | cuda:N (default auto)")
    r.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's default; 1 helps tiny models on a busy CPU)")
    r.add_argument("--backend", choices=("auto", "extension", "reference"), default="auto",
                   help="backend of the sampling step ops.ddpm_step (default auto)")
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
    """np.savez through a temporary file, fsync and rename (see cbdm_fast.atomic)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    import torch
    from tqdm import tqdm

    from . import ops
    from .checkpoint import load_model
    from .imageio import make_grid, save_png, to_uint8
    from .model import count_parameters
    from .samplers import class_balanced_labels, ddpm_sample, uniform_labels
    from .schedule import Schedule
    from .training import resolve_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        if args.backend == "extension" and not ops.extension_available():
            from .ops import _extension
            return _error(f"--backend extension: {_extension.unavailable_reason()}")
        model, info = load_model(args.ckpt, which=args.which, flagfile=args.flagfile,
                                 model_kwargs=model_overrides(args))
    except ValueError as exc:  # CheckpointError (a ValueError), or e.g. --device cuda without CUDA
        return _error(str(exc))

    conditional = model.label_embedding is not None
    if args.method != "uncond" and not conditional:
        return _error(f"--method {args.method} needs a class-conditional model, but this checkpoint's model "
                      f"is unconditional (no label embedding): use --method uncond")
    omega = args.omega
    if args.method != "cfg" and omega != 0:
        print(f"note: --omega applies to --method cfg only; sampling with --method {args.method} "
              f"(recorded as omega 0)", file=sys.stderr)
        omega = 0.0
    num_class, in_ch, T = model.num_class, model.in_ch, model.config["T"]
    size = info["image_size"] or 32
    down = 2 ** (len(model.config["ch_mult"]) - 1)
    if size % down:
        return _error(f"image size {size} is not a multiple of {down} (the UNet downsamples "
                      f"{len(model.config['ch_mult']) - 1} times): check --image-size")

    # labels: class-balanced, i.i.d. uniform, or none (-1) for uncond
    if args.per_class is not None:
        n = args.per_class * num_class
        labels = class_balanced_labels(args.per_class, num_class)
    else:
        n = args.num_samples
        labels = uniform_labels(n, num_class, generator=torch.Generator().manual_seed(args.seed))
    if args.method == "uncond":
        labels = torch.full((n,), -1, dtype=torch.int64)
    labels = labels.to(torch.int64)

    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt.parent / f"samples_{args.method}_w{omega:g}_{n}.npz"
    grid_path = Path(args.grid) if args.grid else out.with_suffix(".png")
    try:
        for p in (out, grid_path):
            p.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(p.parent, os.W_OK):
                return _error(f"cannot write to {p.parent}")
    except OSError as exc:
        return _error(f"cannot create the output folder: {exc}")

    model = model.to(device)
    schedule = Schedule(T, info["beta_1"], info["beta_T"], device=device)
    print(f"model: UNet {count_parameters(model) / 1e6:.2f}M parameters ({args.which} weights), configured "
          f"from {info['source']}; {num_class} classes, {in_ch}x{size}x{size}, T={T}", flush=True)
    print(f"sampling {n} images: method {args.method}, omega {omega:g}, var {args.var_type}, "
          f"clip_x0 {args.clip_x0}, seed {args.seed}, batch {args.batch_size}, device {device}", flush=True)

    images = np.empty((n, size, size, in_ch), dtype=np.uint8)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = math.ceil(n / args.batch_size)
    bar = tqdm(total=batches * T, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress, desc="sampling")
    start_time = time.perf_counter()
    state = {"done": 0.0, "shown": 0.0}

    def on_step(batch_size):
        def progress(step):
            state["done"] += batch_size / T
            bar.update(1)
            now = time.perf_counter()
            if now - state["shown"] > 0.5:
                state["shown"] = now
                bar.set_postfix(samples_s=f"{state['done'] / max(now - start_time, 1e-9):.2f}", refresh=False)
        return progress

    try:
        for first in range(0, n, args.batch_size):
            b = min(args.batch_size, n - first)
            x_T = torch.randn((b, in_ch, size, size), generator=generator, device=device)
            y = None if args.method == "uncond" else labels[first:first + b].to(device)
            x_0 = ddpm_sample(model, schedule, x_T, y, omega=omega, method=args.method, var_type=args.var_type,
                              clip_x0=args.clip_x0, generator=generator, backend=args.backend,
                              progress=on_step(b))
            images[first:first + b] = to_uint8(x_0)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        bar.close()
        return _error(f"out of GPU memory at --batch-size {args.batch_size}: use a smaller --batch-size")
    bar.close()
    elapsed = time.perf_counter() - start_time

    labels_np = labels.numpy()
    try:
        save_npz_atomic(out, images=images, labels=labels_np, omega=np.float64(omega), method=np.str_(args.method),
                        var_type=np.str_(args.var_type), clip_x0=np.bool_(args.clip_x0),
                        seed=np.int64(args.seed), which=np.str_(args.which), ckpt=np.str_(str(ckpt)))
        idx, nrow = grid_indices(labels_np, args.per_class, num_class, args.method != "uncond")
        save_png(make_grid(images[idx], nrow), grid_path, upscale=max(1, 32 // size))
    except OSError as exc:
        return _error(f"cannot write the output: {exc}")
    print(f"wrote {n} images to {out} and the grid {grid_path} ({elapsed:.1f} s, {n / elapsed:.2f} samples/s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
