"""FusedAttnBlock: the DDPM / CBDM single-head attention block on fused ops.

The authors' AttnBlock (x: (B, C, H, W), L = H * W):
    h = GroupNorm(32)(x);  q, k, v = 1x1 convs of h;  w = softmax(q k^T / sqrt(C));  x + proj(w v)
Here: the pre-norm through ops.group_norm_silu(act=False); q, k and v as ONE 1x1 convolution with
the weights [Wq; Wk; Wv] concatenated at every call from the original proj_q / proj_k / proj_v
parameters (so parameter names, the state dict and optimizer bindings do not change);
F.scaled_dot_product_attention with one head of dimension C and scale C ** -0.5 (the authors'
int(C) ** (-0.5)); proj; the residual add.

The block ADOPTS the original block's modules (group_norm wrapped in a GroupNormSiLU that shares its
parameters; proj_q, proj_k, proj_v, proj the very same Conv2d objects) under the same names.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .norm import GroupNormSiLU

__all__ = ["FusedAttnBlock", "is_attn_block"]

_PROJ = ("proj_q", "proj_k", "proj_v", "proj")


def _is_pointwise_conv(m, C: int) -> bool:
    return (type(m) is nn.Conv2d and m.in_channels == C and m.out_channels == C
            and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) and tuple(m.padding) == (0, 0)
            and tuple(m.dilation) == (1, 1) and m.groups == 1)


def is_attn_block(m: nn.Module) -> bool:
    """The authors' AttnBlock, by structure: class name AttnBlock, a group_norm (nn.GroupNorm over C
    channels) and four 1x1 C -> C convolutions proj_q, proj_k, proj_v, proj."""
    if type(m).__name__ != "AttnBlock":
        return False
    gn = getattr(m, "group_norm", None)
    if type(gn) is not nn.GroupNorm:
        return False
    C = gn.num_channels
    return all(_is_pointwise_conv(getattr(m, n, None), C) for n in _PROJ)


class FusedAttnBlock(nn.Module):
    """x + proj(SDPA(q, k, v)) with a fused pre-norm and one q/k/v GEMM. Build it with from_attn_block."""

    def __init__(self, group_norm: GroupNormSiLU, proj_q: nn.Conv2d, proj_k: nn.Conv2d, proj_v: nn.Conv2d,
                 proj: nn.Conv2d):
        super().__init__()
        # registration order = the authors' order, so state_dict keys come out in the same order
        self.group_norm = group_norm
        self.proj_q, self.proj_k, self.proj_v, self.proj = proj_q, proj_k, proj_v, proj

    @classmethod
    def from_attn_block(cls, block: nn.Module, backend: str = "auto") -> "FusedAttnBlock":
        if not is_attn_block(block):
            raise TypeError(f"from_attn_block: {type(block).__name__} does not have the AttnBlock structure "
                            f"(group_norm: nn.GroupNorm; proj_q, proj_k, proj_v, proj: 1x1 C->C nn.Conv2d)")
        return cls(GroupNormSiLU.from_group_norm(block.group_norm, act=False, backend=backend),
                   block.proj_q, block.proj_k, block.proj_v, block.proj)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x)
        convs = (self.proj_q, self.proj_k, self.proj_v)
        weight = torch.cat([c.weight for c in convs], dim=0)  # (3C, C, 1, 1)
        if all(c.bias is None for c in convs):
            bias = None
        else:
            bias = torch.cat([c.bias if c.bias is not None else c.weight.new_zeros(C) for c in convs])
        qkv = F.conv2d(h, weight, bias)  # (B, 3C, H, W)
        qkv = qkv.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, L, 3C): one head
        q, k, v = qkv.split(C, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, scale=int(C) ** (-0.5))  # (B, 1, L, C)
        a = a.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(a)
