"""patch_model's rules for the CBDM authors' UNet, and for cbdm_fast.model.UNet, which has the same
classes, children and forwards. Matched by structure (class name and children), never by class
identity, so the authors' own classes are patched exactly like ours.

The authors' ResBlock(x, temb):
    h = block1(x)                                   block1 = [GroupNorm, Swish, Conv]
    h = h + temb_proj(temb)[:, :, None, None]
    h = block2(h)                                   block2 = [GroupNorm, Swish, Dropout, Conv]
    attn(h + shortcut(x))
Fused: each GroupNorm->Swish pair becomes one op, and the time-embedding add moves into block2's:
    h = block1(x);  h = block2[0](h, add=temb_proj(temb));  h = block2[1:](h);  attn(h + shortcut(x))
The instance's class becomes a subclass of its own (isinstance(m, ResBlock) still holds, so the UNet's
forward still collects skips). Its AttnBlock becomes a FusedAttnBlock (attention.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .attention import FusedAttnBlock, is_attn_block
from .report import FusedNorm, PatchedModule, qualified
from .swap import ORIGINAL_CLASS, fuse_activation, fuse_norm, is_activation, swap_forward

__all__ = ["is_res_block", "patch_res_block", "fused_attn_block"]

_RES_CHILDREN = ("block1", "temb_proj", "block2", "shortcut", "attn")


def _starts_with_norm_act(seq) -> bool:
    return (type(seq) is nn.Sequential and len(seq) >= 2
            and type(seq[0]) is nn.GroupNorm and is_activation(seq[1]))


def is_res_block(m: nn.Module) -> bool:
    """The authors' ResBlock, by structure (see the module docstring); not already fused."""
    if type(m).__name__ != "ResBlock" or getattr(type(m), ORIGINAL_CLASS, None) is not None:
        return False
    if not all(n in m._modules for n in _RES_CHILDREN):
        return False
    return _starts_with_norm_act(m.block1) and _starts_with_norm_act(m.block2)


def _fused_res_forward(self, x, temb):
    h = self.block1(x)  # GroupNorm + Swish in one op, then the conv
    h = self.block2[0](h, add=self.temb_proj(temb))  # (h + temb) -> GroupNorm -> Swish in one op
    for i, layer in enumerate(self.block2):
        if i > 0:
            h = layer(h)
    h = h + self.shortcut(x)
    return self.attn(h)


def patch_res_block(block: nn.Module, prefix: str, backend: str) -> Optional[PatchedModule]:
    """Fuse a ResBlock's two GroupNorm->Swish pairs and its time-embedding add; None if not one."""
    if not is_res_block(block):
        return None
    for seq in (block.block1, block.block2):
        fuse_norm(seq, "0", act=True, backend=backend)
        fuse_activation(seq, "1")
    swap_forward(block, _fused_res_forward, "the time-embedding add fused into block2's GroupNorm")
    names = {f"{s}.{i}": qualified(prefix, f"{s}.{i}") for s in ("block1", "block2") for i in (0, 1)}
    return PatchedModule(
        prefix, "ResBlock", replaced=(prefix, *names.values()),
        norms=(FusedNorm(names["block1.0"], act=True), FusedNorm(names["block2.0"], act=True, add=True)))


def fused_attn_block(block: nn.Module, name: str, backend: str) -> Optional[Tuple[FusedAttnBlock, PatchedModule]]:
    """The FusedAttnBlock to put in place of an AttnBlock, and its report entry; None if not one."""
    if not is_attn_block(block):
        return None
    return FusedAttnBlock.from_attn_block(block, backend), PatchedModule(
        name, "AttnBlock", replaced=(name,), norms=(FusedNorm(qualified(name, "group_norm")),),
        fused=("q/k/v as one 1x1 conv", "attention by F.scaled_dot_product_attention"))
