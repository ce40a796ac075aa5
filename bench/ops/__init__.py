"""The per-op benchmark's setups, one file per op: every fused op against its torch composite and
torch.compile of that composite (``python -m cbdm_fast.bench ops``; the runner is run.py).

    op                   file            train shape(s) (``--size small``: tiny ones that run in seconds on a CPU)
    group_norm_silu      group_norm.py   96x256x16x16, 96x128x32x32
    group_norm_silu_add  group_norm.py   the same, with the (N, C) time-embedding add
    group_norm           group_norm.py   the same, without the SiLU
    q_sample             q_sample.py     128x3x32x32
    cb_loss              cb_loss.py      h, h_bal: halves of 256x3x32x32
    attn_block           attn_block.py   96x256x16x16
    ddpm_step            ddpm_step.py    64x3x32x32, 256x3x32x32
    ddim_step            ddim_step.py    64x3x32x32, 256x3x32x32

Each file's docstring names its torch and fused providers, its inputs and its byte model (the counted
minimum bytes that GB/s is computed from). The "compiled" provider is ``torch.compile`` of the torch
provider (torch._dynamo.reset() before each setup). The fused provider forces the fused backend: where it
cannot run (no GPU and no TRITON_INTERPRET=1, an extension that is not built, a dtype the backend does not
take) the row carries an ``error`` instead of silently timing the reference. Every provider of a setup
gets the same input tensors (the same module initialisation for attn_block).
"""
from __future__ import annotations

import torch

from . import attn_block, cb_loss, ddim_step, ddpm_step, group_norm, q_sample
from .case import LAYOUTS, SIZES, OpCase

OPS = ("group_norm_silu", "group_norm_silu_add", "group_norm", "q_sample", "cb_loss", "attn_block",
       "ddpm_step", "ddim_step")


def build_cases(op: str, size: str = "small", dtype: torch.dtype = torch.float32, layout: str = "channels_last",
                device="cpu", seed: int = 0) -> list[OpCase]:
    """The setups of ``op`` (one per shape) at ``size``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    device = torch.device(device)
    if op.startswith("group_norm"):
        return group_norm.cases(op, size, dtype, layout, device, seed)
    setup = {"q_sample": q_sample, "cb_loss": cb_loss, "attn_block": attn_block, "ddpm_step": ddpm_step,
             "ddim_step": ddim_step}[op]
    return setup.cases(size, dtype, layout, device, seed)
