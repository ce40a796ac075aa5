"""What every op setup is made of: the OpCase (an op at one shape, dtype and layout with its providers),
the Runner of one provider, the sizes, and the seeded inputs every provider of a setup shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

PROVIDERS = ("torch", "fused", "compiled")
MODES = ("fwd", "bwd", "full")
SIZES = ("small", "train")
LAYOUTS = ("channels_last", "contiguous")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

T = 1000
SHAPES = {
    # the training / sampling shapes of the default UNet
    "train": dict(norm=[(96, 256, 16, 16), (96, 128, 32, 32)], image_batch=128, image_size=32,
                  attn=(96, 256, 16, 16), step_batches=(64, 256)),
    # small: seconds on a CPU, also through the Triton interpreter; >= 2 channels per group, so no
    # gradient is exactly zero (with one channel per group, d add is 0 in exact arithmetic)
    "small": dict(norm=[(1, 64, 8, 8), (1, 128, 4, 4)], image_batch=4, image_size=8,
                  attn=(1, 64, 8, 8), step_batches=(4, 8)),
}


@dataclass
class Runner:
    """One provider of one setup: ``fn()`` runs the forward; ``inputs`` are the tensors its backward
    differentiates (empty: no backward), named by ``names`` (shared names across providers)."""
    fn: Callable[[], Any]
    inputs: tuple = ()
    names: tuple = ()
    note: Optional[str] = None


@dataclass
class OpCase:
    """One benchmark setup: an op at one shape, dtype and layout, with its providers."""
    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    device: torch.device
    bytes: dict                         # mode -> counted minimum bytes (its keys are the op's modes)
    make: Callable[[str], Runner]       # provider -> Runner
    grad_outputs: Optional[tuple] = None
    flops: Optional[dict] = None        # mode -> FLOPs (attn_block only)
    note: Optional[str] = None

    @property
    def modes(self) -> tuple:
        return tuple(self.bytes)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, g, device, dtype, layout="contiguous", scale=1.0, offset=0.0, grad=False) -> Tensor:
    """A seeded normal tensor (drawn in fp32 on the host, so every device and dtype gets the same values)."""
    if device.type == "meta":  # shapes and byte counts only
        x = torch.empty(shape, device=device, dtype=dtype)
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float32) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def numel_and_size(shape, dtype: torch.dtype) -> tuple[int, int]:
    """(elements of ``shape``, bytes per element of ``dtype``): the n and e of the byte models."""
    return int(np.prod(shape)), torch.empty((), dtype=dtype).element_size()


def with_full(nbytes: dict) -> dict:
    """The byte model with "full" = fwd + bwd where the op has a backward."""
    if "bwd" in nbytes:
        nbytes["full"] = nbytes["fwd"] + nbytes["bwd"]
    return nbytes


def compiled(fn):
    """torch.compile of ``fn`` from empty caches (no recompile limit carried across setups)."""
    torch._dynamo.reset()
    return torch.compile(fn)


def image_shape(size: str, B: Optional[int] = None) -> tuple:
    s = SHAPES[size]
    return (s["image_batch"] if B is None else B, 3, s["image_size"], s["image_size"])


def step_cases(op: str, size: str, dtype: torch.dtype, device: torch.device, seed: int, setup: Callable,
               reference: Callable, fused: Callable, fwd_bytes: Callable[[int, int, int], int],
               note: str) -> list[OpCase]:
    """The setups of a sampling step op, one per sampling batch: x_t, eps_c, eps_u and noise drawn here
    (contiguous), the op's other arguments by ``setup(x_t, eps_c, eps_u, noise, g)``; forward only."""
    out = []
    for k, B in enumerate(SHAPES[size]["step_batches"]):
        shape = image_shape(size, B)
        n, e = numel_and_size(shape, dtype)
        g = generator(seed + k)
        x_t, eps_c, eps_u, noise = (randn(shape, g, device, dtype) for _ in range(4))
        args = setup(x_t, eps_c, eps_u, noise, g)

        def make(provider, args=args):
            if provider == "fused":
                return Runner(lambda: fused(*args, backend="extension"))
            f = reference if provider == "torch" else compiled(reference)
            return Runner(lambda: f(*args))

        out.append(OpCase(op, shape, dtype, "contiguous", device, {"fwd": fwd_bytes(n, e, B)}, make, note=note))
    return out
