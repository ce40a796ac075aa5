"""The fused ops inside a client codebase: ``python -m cbdm_fast.bench.diffusers_bench --device cuda --json OUT``.

HF diffusers' class-conditional UNet2DModel at a CIFAR-like size (32x32, block_out_channels (128, 256,
256, 256), two resnets per level, attention at 16x16, 100 classes; --small: a tiny one for CPU runs),
one forward + backward of the epsilon MSE loss per call, timed side by side in one run:

  eager            the model as diffusers builds it
  patched          after ``patch_model`` (its GroupNorm+SiLU pairs, time-embedding adds and attention
                   norms fused; the report's counts go in the record)
  compiled         torch.compile of the unpatched model
  patched_compiled torch.compile of the patched model (the fused ops are opaque custom ops to inductor)

bf16 autocast and channels_last on CUDA, fp32 on the CPU (where the Triton kernels only run through the
interpreter, so ``patch_model``'s auto backend keeps the torch path and "patched" measures the patching's
own overhead). Time per call: CUDA events around each call (host time included, as a client sees it),
median of --iters after --warmup calls; the first calls of the compiled rows compile.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cbdm_fast.flags import require_at_least

from .cli_checks import add_output_args, parse_names
from .common import device_name, git_commit, markdown_table, provenance, publish, time_fn

PROVIDERS = ("eager", "patched", "compiled", "patched_compiled")
CIFAR = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=100)
SMALL = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
             attn_norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10)


def build_unet(small: bool):
    import diffusers
    cfg = SMALL if small else CIFAR
    return diffusers.UNet2DModel(in_channels=3, out_channels=3, attention_head_dim=8 if small else 64, **cfg)


def run_diffusers_bench(device="cuda", batch_size: int = 64, small: bool = False, providers=PROVIDERS,
                        warmup: int = 5, iters: int = 20, seed: int = 0, log=print) -> list[dict]:
    from cbdm_fast.nn import patch_model

    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    base = build_unet(small).to(device)
    size, classes = base.config.sample_size, base.config.num_class_embeds
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    y = torch.randint(0, classes, (batch_size,), generator=g).to(device)
    if cuda:
        x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
    records = []
    for name in providers:
        model = copy.deepcopy(base)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        report = patch_model(model) if name.startswith("patched") else None
        run = torch.compile(model) if name.endswith("compiled") else model

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.mse_loss(run(x, t, class_labels=y).sample.float(), noise)
            loss.backward()
            return loss

        times = time_fn(step, device, warmup, iters)["times_ms"]
        ms = float(np.median(times))
        records.append(dict(provider=name, device=device.type, device_name=device_name(device),
                            torch_version=torch.__version__, git_commit=git_commit(), batch_size=batch_size,
                            model="small" if small else "cifar", bf16=cuda, channels_last=cuda, median_ms=ms,
                            p20_ms=float(np.percentile(times, 20)), p80_ms=float(np.percentile(times, 80)),
                            img_per_s=batch_size / (ms * 1e-3),
                            fused_pairs=None if report is None else report.pairs_fused,
                            fused_adds=None if report is None else report.adds_fused))
        log(f"[diffusers] {name}: {ms:.2f} ms per forward+backward")
    eager = {r["provider"]: r["median_ms"] for r in records}
    for r in records:  # patched against unpatched, each in its own mode
        other = r["provider"].replace("patched_", "").replace("patched", "eager")
        r["speedup_vs_unpatched"] = eager[other] / r["median_ms"] if other != r["provider"] and other in eager else None
    return records


COLUMNS = ("provider", "median ms", "p20/p80 ms", "img/s", "patched vs unpatched", "fused pairs / adds")


def format_markdown(records: list[dict]) -> str:
    r0 = records[0]
    header = (f"diffusers UNet2DModel ({r0['model']}), batch {r0['batch_size']}, {provenance(r0)}; forward+backward "
              f"of the MSE loss, {'bf16 autocast, channels_last' if r0['bf16'] else 'fp32'}")
    rows = [[r["provider"], f"{r['median_ms']:.2f}", f"{r['p20_ms']:.2f}/{r['p80_ms']:.2f}", f"{r['img_per_s']:.1f}",
             f"{r['speedup_vs_unpatched']:.2f}x" if r["speedup_vs_unpatched"] else "-",
             f"{r['fused_pairs']} / {r['fused_adds']}" if r["fused_pairs"] is not None else "-"] for r in records]
    return markdown_table(header, COLUMNS, rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbdm_fast.bench.diffusers_bench", description=__doc__.splitlines()[0])
    add_output_args(p, json_help="write a JSON list, one record per provider", device="cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--small", action="store_true", help="a tiny UNet2DModel (CPU smoke runs)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated from {','.join(PROVIDERS)}")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    providers = parse_names(args.providers, "--providers", PROVIDERS, p.error, noun="provider")
    require_at_least(p, ("--batch-size", args.batch_size, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        p.error("needs HF diffusers: pip install --no-deps diffusers==0.42.1 (see .ci/run for its few dependencies)")
    records = run_diffusers_bench(args.device, args.batch_size, args.small, providers, args.warmup, args.iters)
    publish(records, format_markdown(records), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
