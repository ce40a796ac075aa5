"""patch_model's rules for HF diffusers' UNet2DModel and its blocks, recognised by structure (class
name, attribute names and types; diffusers is never imported here).

ResnetBlock2D(x, temb) in diffusers (act: its one shared activation module, `nonlinearity`):
    h = act(norm1(x));  up/down-sample x and h;  h = conv1(h)
    temb = time_emb_proj(act(temb))                  (no act when skip_time_act)
    "default":      h = act(norm2(h + temb))
    "scale_shift":  scale, shift = chunk(temb, 2);  h = act(norm2(h) * (1 + scale) + shift)
    h = conv2(dropout(h));  (conv_shortcut(x) + h) / output_scale_factor
Fused (act is nn.SiLU): norm1 + SiLU as one op; in "default" mode norm2(h + temb) + SiLU as one op,
the add inside it. "scale_shift" keeps diffusers' own norm2 -> scale/shift -> SiLU (norm2 alone runs
through the op): ops.group_norm_silu has no scale/shift yet. The block's class becomes a subclass
of its own whose forward is the one above with those ops; everything else is diffusers' code as it is.
With another activation (mish, gelu, relu) norm1 and norm2 run through the op without it.

Attention (AttnDownBlock2D, AttnUpBlock2D, UNetMidBlock2D): its group_norm runs through the op
(norm only: no activation follows it); the processor is kept (AttnProcessor2_0 already calls
F.scaled_dot_product_attention). UNet2DModel: conv_norm_out + conv_act as one op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .report import FusedNorm, PatchedModule, qualified
from .swap import fuse_activation, fuse_norm, is_activation, swap_forward

__all__ = ["is_resnet_block_2d", "is_attention", "patch_resnet_block_2d", "patch_attention",
           "patch_unet_2d_output"]

_MODES = ("default", "scale_shift")
_RESNET_ATTRS = ("upsample", "downsample", "skip_time_act", "output_scale_factor", "conv_shortcut")


def is_resnet_block_2d(m: nn.Module) -> bool:
    """diffusers' ResnetBlock2D, not yet patched: GroupNorms norm1 and norm2, Conv2d conv1 and conv2,
    an nn.Linear (or None) time_emb_proj, an activation module nonlinearity, a dropout, a known
    time_embedding_norm and the other attributes its forward reads."""
    if type(m).__name__ != "ResnetBlock2D":
        return False
    if type(m._modules.get("norm1")) is not nn.GroupNorm or type(m._modules.get("norm2")) is not nn.GroupNorm:
        return False
    if not (isinstance(m._modules.get("conv1"), nn.Conv2d) and isinstance(m._modules.get("conv2"), nn.Conv2d)):
        return False
    if "time_emb_proj" not in m._modules or not isinstance(m.time_emb_proj, (nn.Linear, type(None))):
        return False
    if not isinstance(m._modules.get("nonlinearity"), nn.Module) or "dropout" not in m._modules:
        return False
    return getattr(m, "time_embedding_norm", None) in _MODES and all(hasattr(m, a) for a in _RESNET_ATTRS)


def _fused_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    # args / kwargs: diffusers' deprecated `scale`, which its forward ignores too (after a warning)
    hidden_states = self.norm1(input_tensor)  # norm1 + SiLU, one op

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    add = None  # the projected time embedding, (N, C)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        add = self.time_emb_proj(temb)
        temb = add[:, :, None, None]

    if self.time_embedding_norm == "default":
        if add is None and temb is not None:  # no projection: diffusers adds temb as it comes
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states, add=add)  # (h + temb) -> norm2 -> SiLU, one op
    else:  # "scale_shift": diffusers' formula around the norm
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)  # the norm alone through the op
        hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: avoids DDP's gradient-stride warning
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    return (input_tensor + hidden_states) / self.output_scale_factor


def patch_resnet_block_2d(block: nn.Module, prefix: str, backend: str) -> Optional[PatchedModule]:
    """Fuse a ResnetBlock2D's GroupNorm->SiLU pairs (and, in "default" mode, its time-embedding
    add); None if block is not one."""
    if not is_resnet_block_2d(block):
        return None
    norm1, norm2 = qualified(prefix, "norm1"), qualified(prefix, "norm2")
    act = block.nonlinearity
    if not is_activation(act):
        fuse_norm(block, "norm1", act=False, backend=backend)
        fuse_norm(block, "norm2", act=False, backend=backend)
        return PatchedModule(prefix, "ResnetBlock2D", replaced=(norm1, norm2),
                             norms=(FusedNorm(norm1), FusedNorm(norm2)),
                             left=(f"{type(act).__name__} after norm1 and norm2: the op fuses SiLU only",))
    default = block.time_embedding_norm == "default"
    fuse_norm(block, "norm1", act=True, backend=backend)
    fuse_norm(block, "norm2", act=default, backend=backend)
    swap_forward(block, _fused_resnet_forward, "GroupNorm + SiLU (+ the time-embedding add) as one op")
    left = () if default else ("norm2's scale/shift and SiLU (time_embedding_norm 'scale_shift'): "
                               "ops.group_norm_silu has no scale/shift yet",)
    add = default and block.time_emb_proj is not None
    return PatchedModule(prefix, "ResnetBlock2D", replaced=(prefix, norm1, norm2),
                         norms=(FusedNorm(norm1, act=True), FusedNorm(norm2, act=default, add=add)), left=left)


def is_attention(m: nn.Module) -> bool:
    """diffusers' Attention with a GroupNorm (group_norm) before its q/k/v projections; not yet patched."""
    return (type(m).__name__ == "Attention" and type(m._modules.get("group_norm")) is nn.GroupNorm
            and all(isinstance(m._modules.get(n), nn.Linear) for n in ("to_q", "to_k", "to_v"))
            and hasattr(m, "processor"))


def patch_attention(attn: nn.Module, prefix: str, backend: str) -> Optional[PatchedModule]:
    """Run an Attention's group_norm through the op; keep its processor. None if attn is not one."""
    if not is_attention(attn):
        return None
    fuse_norm(attn, "group_norm", act=False, backend=backend)
    processor = type(attn.processor).__name__
    why = ("it already calls F.scaled_dot_product_attention" if processor == "AttnProcessor2_0"
           else "patch_model does not replace attention processors")
    name = qualified(prefix, "group_norm")
    return PatchedModule(prefix, "Attention", replaced=(name,), norms=(FusedNorm(name),),
                         left=(f"processor {processor} kept: {why}",))


def patch_unet_2d_output(unet: nn.Module, prefix: str, backend: str) -> Optional[PatchedModule]:
    """UNet2DModel's conv_norm_out + conv_act (its forward applies conv_act there only) as one op.
    None if unet is not one (its blocks are patched by the other rules as patch_model walks on)."""
    if (type(unet).__name__ != "UNet2DModel" or type(unet._modules.get("conv_norm_out")) is not nn.GroupNorm
            or not is_activation(unet._modules.get("conv_act"))):
        return None
    fuse_norm(unet, "conv_norm_out", act=True, backend=backend)
    fuse_activation(unet, "conv_act")
    norm, act = qualified(prefix, "conv_norm_out"), qualified(prefix, "conv_act")
    return PatchedModule(prefix, "UNet2DModel", replaced=(norm, act), norms=(FusedNorm(norm, act=True),))
