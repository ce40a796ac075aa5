"""The labels a sampling run asks for: class-balanced (training grids, --per-class) or i.i.d. uniform
(the authors' evaluation protocol, --num-samples)."""
from __future__ import annotations

from typing import Optional

import torch


def class_balanced_labels(n_per_class: int, num_class: int, device=None) -> torch.Tensor:
    """Exactly n_per_class labels of every class, class 0 first: [0]*n, [1]*n, ..."""
    return torch.arange(num_class, device=device).repeat_interleave(n_per_class)


def uniform_labels(n: int, num_class: int, generator: Optional[torch.Generator] = None, device=None):
    """n i.i.d. uniform labels, as the authors draw them for evaluation."""
    return torch.randint(num_class, (n,), generator=generator).to(device)
