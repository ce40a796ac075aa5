"""patch_model(model): swap fused modules into ANY model in place; unpatch_model(model) undoes it.

What is matched (by structure, never by class identity, so the authors' own UNet classes are
patched exactly like cbdm_fast.model's, which have the same names and structure):
  * AttnBlock: class name "AttnBlock" with group_norm (nn.GroupNorm over C channels) and 1x1 C -> C
    nn.Conv2d proj_q, proj_k, proj_v, proj  ->  FusedAttnBlock adopting those modules.
  * ResBlock: class name "ResBlock" with children block1, temb_proj, block2, shortcut, attn, where
    block1 and block2 are nn.Sequential starting (nn.GroupNorm, activation). The instance's class is
    swapped for a subclass of its own class (isinstance(m, ResBlock) still holds, so the UNets'
    forward still concatenates skips) whose forward fuses the time-embedding add into block2's norm:
        h = block1(x); h = block2[0](h, add=temb_proj(temb)); h = block2[1:](h); h + shortcut(x) -> attn
    which is the authors' h = block1(x); h += temb_proj(temb)[:, :, None, None]; block2(h); ...
  * In any plain nn.Sequential (type exactly nn.Sequential): nn.GroupNorm at index i immediately
    followed by an activation (nn.SiLU, or a module whose class name is Swish or SiLU) -> index i
    becomes GroupNormSiLU(act=True) holding the same weight and bias, index i + 1 becomes an
    nn.Identity; indices, hence state-dict keys, are kept.
  * Any other nn.GroupNorm (type exactly nn.GroupNorm: subclasses may change forward) that is a
    child of some module -> GroupNormSiLU(act=False).
The root module itself is never replaced (there is no parent to swap it in); a root ResBlock is
class-swapped and its children patched.

Parameters are shared (the same Parameter objects), so state-dict keys, parameter identity and an
optimizer built before patching are unchanged. Every replacement keeps the module it replaced
(a hidden attribute, not a submodule: not in the state dict), and unpatch_model puts them back, so
the unpatched model runs exactly its original modules and forwards. Patching twice is a no-op.
"""
from __future__ import annotations

from typing import List

from torch import nn

from .attention import FusedAttnBlock, is_attn_block
from ..ops.group_norm_silu import BACKENDS
from .norm import GroupNormSiLU

__all__ = ["patch_model", "unpatch_model", "is_activation", "is_res_block"]

_ACT_NAMES = ("Swish", "SiLU")
_RES_CHILDREN = ("block1", "temb_proj", "block2", "shortcut", "attn")


def is_activation(m) -> bool:
    """nn.SiLU, or any module whose class is named Swish or SiLU (the authors' Swish)."""
    return isinstance(m, nn.SiLU) or type(m).__name__ in _ACT_NAMES


def _starts_with_norm_act(seq) -> bool:
    return (type(seq) is nn.Sequential and len(seq) >= 2
            and isinstance(seq[0], (nn.GroupNorm, GroupNormSiLU)) and is_activation(seq[1]))


def is_res_block(m: nn.Module) -> bool:
    """The authors' ResBlock, by structure (see the module docstring); not already fused."""
    if type(m).__name__ != "ResBlock" or getattr(type(m), "_cbdm_original_class", None) is not None:
        return False
    if not all(n in m._modules for n in _RES_CHILDREN):
        return False
    return _starts_with_norm_act(m.block1) and _starts_with_norm_act(m.block2)


class _FusedActIdentity(nn.Identity):
    """nn.Identity standing where an activation was (now fused into the GroupNormSiLU before it)."""


def _hidden(module: nn.Module, name: str, value) -> nn.Module:
    object.__setattr__(module, name, value)
    return module


def _fused_res_forward(self, x, temb):
    h = self.block1(x)
    norm = self.block2[0]
    if isinstance(norm, GroupNormSiLU) and norm.act:
        h = norm(h, add=self.temb_proj(temb))
        for i, layer in enumerate(self.block2):
            if i > 0:
                h = layer(h)
    else:  # block2 is not (or no longer) fused: the original formula
        h = self.block2(h + self.temb_proj(temb)[:, :, None, None])
    h = h + self.shortcut(x)
    return self.attn(h)


_FUSED_CLASSES: dict = {}


def _fused_res_class(cls: type) -> type:
    """A subclass of cls whose forward fuses the time-embedding add (one per original class)."""
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        fused = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _fused_res_forward, "_cbdm_original_class": cls,
            "__module__": __name__, "__doc__": f"{cls.__qualname__} with the time-embedding add fused "
                                                f"into block2's GroupNorm (cbdm_fast.nn.patch_model)."})
        _FUSED_CLASSES[cls] = fused
    return fused


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _patch(module: nn.Module, prefix: str, replaced: List[str], backend: str) -> None:
    if is_res_block(module):
        module.__class__ = _fused_res_class(type(module))
        replaced.append(prefix)
    pairs = set()
    if type(module) is nn.Sequential:
        children = list(module._modules.items())
        for i in range(len(children) - 1):
            (n0, m0), (n1, m1) = children[i], children[i + 1]
            if type(m0) is nn.GroupNorm and is_activation(m1) and n0 not in pairs:
                setattr(module, n0, GroupNormSiLU.from_group_norm(m0, act=True, backend=backend))
                setattr(module, n1, _hidden(_FusedActIdentity(), "_cbdm_original", m1))
                pairs.update((n0, n1))
                replaced += [_join(prefix, n0), _join(prefix, n1)]
    for name, child in list(module._modules.items()):
        if child is None or name in pairs:
            continue
        qual = _join(prefix, name)
        if is_attn_block(child):
            setattr(module, name, FusedAttnBlock.from_attn_block(child, backend))
            replaced.append(qual)
        elif type(child) is nn.GroupNorm:
            setattr(module, name, GroupNormSiLU.from_group_norm(child, act=False, backend=backend))
            replaced.append(qual)
        else:
            _patch(child, qual, replaced, backend)


def patch_model(model: nn.Module, *, backend: str = "auto") -> List[str]:
    """Swap fused modules into model in place (see the module docstring). Returns the qualified
    names of what it patched: each replaced GroupNorm, each activation fused into the GroupNorm
    before it (now an nn.Identity), each AttnBlock, each ResBlock whose time-embedding add was
    fused ("" for a root ResBlock). Parameters stay the same objects under the same names.
    backend: the ops.group_norm_silu backend of every GroupNormSiLU ("auto", "triton", "reference")."""
    if backend not in BACKENDS:
        raise ValueError(f"patch_model: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be an nn.Module, got {type(model).__name__}")
    replaced: List[str] = []
    _patch(model, "", replaced, backend)
    return replaced


def _unpatch(module: nn.Module, prefix: str, restored: List[str]) -> None:
    original_class = getattr(type(module), "_cbdm_original_class", None)
    if original_class is not None:
        module.__class__ = original_class
        restored.append(prefix)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qual = _join(prefix, name)
        original = child.__dict__.get("_cbdm_original")
        if original is not None:
            setattr(module, name, original)
            restored.append(qual)
            child = original
        _unpatch(child, qual, restored)


def unpatch_model(model: nn.Module) -> List[str]:
    """Undo patch_model in place: the original modules (the very objects patch_model replaced) and
    the original ResBlock classes come back. Returns the qualified names restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model: model must be an nn.Module, got {type(model).__name__}")
    restored: List[str] = []
    _unpatch(model, "", restored)
    return restored
