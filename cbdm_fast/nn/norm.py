"""GroupNormSiLU: nn.GroupNorm (+ SiLU) as one fused op, ops.group_norm_silu.

    y = silu(group_norm(x + add[:, :, None, None]))     (act=False: no SiLU; add optional, (N, C))

Parameters are named like nn.GroupNorm's (weight, bias), so state dicts are unchanged.
``GroupNormSiLU.from_group_norm(gn, act)`` SHARES gn's Parameter objects (no copy: an optimizer
built on the original model keeps updating the patched one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from ..ops.group_norm_silu import BACKENDS

__all__ = ["GroupNormSiLU"]


class GroupNormSiLU(nn.Module):
    """Drop-in for nn.GroupNorm followed by SiLU (act=True) or for nn.GroupNorm alone (act=False).

    forward(x, add=None): x (N, C, *spatial) with at least one spatial dim goes through
    ops.group_norm_silu (backend "auto": Triton where it can run, else the torch
    reference; "reference" forces the torch path, "triton" the kernels); x of rank 2 (which
    nn.GroupNorm also accepts) goes through F.group_norm (+ F.silu) and cannot take ``add``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: bool = True, device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GroupNormSiLU: backend must be one of {BACKENDS}, "
                             f"got {backend!r}")
        self.backend = backend
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNormSiLU: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), float(eps)
        self.affine, self.act = bool(affine), bool(act)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, act: bool = True, backend: str = "auto") -> "GroupNormSiLU":
        """A GroupNormSiLU holding gn's own weight and bias Parameters (shared, not copied)."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"from_group_norm: gn must be an nn.GroupNorm, got {type(gn).__name__}")
        m = cls(gn.num_groups, gn.num_channels, gn.eps, affine=False, act=act, backend=backend)
        m.affine = gn.affine
        if gn.weight is not None:
            m.weight = gn.weight  # the same Parameter object
        if gn.bias is not None:
            m.bias = gn.bias
        return m

    def forward(self, x: Tensor, add: Optional[Tensor] = None) -> Tensor:
        w, b = self.weight, self.bias
        if x.dim() < 3:
            if add is not None:
                raise ValueError("GroupNormSiLU: add needs x with a spatial dimension, got x of shape "
                                 f"{tuple(x.shape)}")
            z = F.group_norm(x, self.num_groups, w, b, self.eps)
            return F.silu(z) if self.act else z
        if w is None:
            w = torch.ones(self.num_channels, dtype=x.dtype, device=x.device)
        if b is None:
            b = torch.zeros(self.num_channels, dtype=x.dtype, device=x.device)
        if add is not None and add.dtype != x.dtype:
            add = add.to(x.dtype)
        return ops.group_norm_silu(x, w, b, self.num_groups, self.eps, add=add, act=self.act,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"act={self.act}" + ("" if self.backend == "auto" else f", backend={self.backend!r}"))
