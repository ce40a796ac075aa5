"""What the model-level benchmarks (train, sample, ceiling, profile_step) run: the UNet sizes and the
synthetic long-tailed batches, the same for every backend of a run."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

T = 1000
IMBALANCE = 0.01  # n_c / n_0 of the last class (CIFAR-LT's imbalance factor 0.01)
# model name -> (UNet kwargs, default image size, default number of classes)
MODELS = {
    "default": (dict(ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=2, dropout=0.1), 32, 100),
    "small": (dict(ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1), 16, 10),
}


def model_config(name: str, num_class: int) -> dict:
    """The UNet kwargs of model ``name`` with ``num_class`` classes (class-conditional, no ADA)."""
    kw = dict(MODELS[name][0])
    return dict(T=T, num_class=num_class, in_ch=3, cond=True, augm=False, **kw)


def model_defaults(name: str, image_size: Optional[int], num_class: Optional[int]) -> tuple[int, int]:
    """(image size, number of classes): the given values, else model ``name``'s defaults."""
    _, size, nc = MODELS[name]
    return (size if image_size is None else image_size), (nc if num_class is None else num_class)


@dataclass
class WorkloadConfig:
    """What every benchmark's configuration starts with: where it runs, the batch, the UNet, the warm-up."""
    device: str = "cpu"
    batch_size: int = 8                # B: a training step's forward, and a guided sampling step's, run 2B
    model: str = "default"             # a MODELS preset
    image_size: Optional[int] = None   # None: the model's default
    num_class: Optional[int] = None    # None: the model's default
    warmup: int = 2


def long_tail_probs(num_class: int, imbalance: float = IMBALANCE) -> torch.Tensor:
    """Class frequencies n_c / n_0 = imbalance^(c / (C - 1)) (CIFAR-LT style), float64, summing to 1."""
    if num_class == 1:
        return torch.ones(1, dtype=torch.float64)
    p = imbalance ** (torch.arange(num_class, dtype=torch.float64) / (num_class - 1))
    return p / p.sum()


def synthetic_batches(n: int, B: int, size: int, probs: torch.Tensor, device, seed: int):
    """n batches of images uniform in [-1, 1] and long-tailed labels, already on the device."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand((B, 3, size, size), generator=g) * 2 - 1
        y = torch.multinomial(probs, B, replacement=True, generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def count_forward_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on (x, t = 0, y), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    m = copy.deepcopy(model).eval()
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x, t, y=y)
    return int(fc.get_total_flops())


def use_fast_cuda_math(device: torch.device) -> None:
    """On CUDA: TF32 convolutions and matmuls (the authors' fp32 path runs them) and cuDNN autotuning."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
