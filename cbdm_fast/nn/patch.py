"""patch_model(model): swap fused modules into ANY model in place; unpatch_model(model) undoes it.

patch_model walks the model from the root. At each module it tries the block rules, which know a
block by its structure (class name, children, attributes) and never by class identity or import:
  * authors.py: the CBDM authors' ResBlock (and cbdm_fast.model's): both GroupNorm->Swish pairs
    fused, the time-embedding add fused into the second; their AttnBlock -> FusedAttnBlock (one
    q/k/v GEMM and SDPA).
  * diffusers.py: HF diffusers' ResnetBlock2D (GroupNorm->SiLU pairs, the "default" time-embedding
    add), Attention (its group_norm), UNet2DModel (conv_norm_out + conv_act).
  * here: in any plain nn.Sequential (type exactly nn.Sequential), an nn.GroupNorm immediately
    followed by an activation (see swap.is_activation) -> GroupNormSiLU(act=True) and an nn.Identity,
    at the same indices, hence the same state-dict keys.
Then any other nn.GroupNorm child (type exactly nn.GroupNorm: a subclass may change forward) runs
through the op as a norm alone, and the walk goes on into the remaining children. The root module
itself is never replaced (there is no parent to swap it in); a root block is patched in place.

Parameters are shared (the same Parameter objects), so state-dict keys, parameter identity and an
optimizer built before patching are unchanged. Every replacement keeps the module it replaced
(swap.py), and unpatch_model puts them back, so the unpatched model runs exactly its original modules
and forwards. Patching twice is a no-op: a patched block no longer matches its rule.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from ..ops.group_norm_silu import BACKENDS
from . import authors, diffusers
from .report import FusedNorm, PatchedModule, PatchReport, qualified
from .swap import ORIGINAL, ORIGINAL_CLASS, fuse_activation, fuse_norm, is_activation, replace

__all__ = ["patch_model", "unpatch_model"]


def _patch_sequential_pairs(seq: nn.Module, prefix: str, backend: str) -> Optional[PatchedModule]:
    """Each (nn.GroupNorm, activation) pair of adjacent children of a plain nn.Sequential as one op."""
    if type(seq) is not nn.Sequential:
        return None
    children = list(seq._modules.items())
    replaced, norms = [], []
    i = 0
    while i < len(children) - 1:
        (n0, m0), (n1, m1) = children[i], children[i + 1]
        if type(m0) is nn.GroupNorm and is_activation(m1):
            fuse_norm(seq, n0, act=True, backend=backend)
            fuse_activation(seq, n1)
            replaced += [qualified(prefix, n0), qualified(prefix, n1)]
            norms.append(FusedNorm(qualified(prefix, n0), act=True))
            i += 2
        else:
            i += 1
    return PatchedModule(prefix, "Sequential", replaced=tuple(replaced), norms=tuple(norms)) if norms else None


# the rules that patch a module in place; a module matches at most one
_BLOCK_RULES = (authors.patch_res_block, diffusers.patch_resnet_block_2d, diffusers.patch_attention,
                diffusers.patch_unet_2d_output, _patch_sequential_pairs)
_NORM_ONLY_WHY = "no activation fused: only one that follows it in an nn.Sequential or a known block is"


def _patch(module: nn.Module, prefix: str, report: PatchReport, backend: str) -> None:
    for rule in _BLOCK_RULES:
        entry = rule(module, prefix, backend)
        if entry is not None:
            report.record(entry)
            break
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qual = qualified(prefix, name)
        attn = authors.fused_attn_block(child, qual, backend)
        if attn is not None:
            replace(module, name, attn[0])
            report.record(attn[1])
        elif type(child) is nn.GroupNorm:
            fuse_norm(module, name, act=False, backend=backend)
            report.record(PatchedModule(qual, "GroupNorm", replaced=(qual,), norms=(FusedNorm(qual),),
                                        left=(_NORM_ONLY_WHY,)))
        else:
            _patch(child, qual, report, backend)


def patch_model(model: nn.Module, *, backend: str = "auto", verbose: bool = False) -> PatchReport:
    """Swap fused modules into model in place (see the module docstring).

    Returns a PatchReport: the list of qualified names it replaced, as before (each replaced
    GroupNorm, each activation fused into the GroupNorm before it, now an nn.Identity, each
    AttnBlock, each block whose class was swapped for a fused forward, "" for the root), with
    ``.modules``: per module which GroupNorms were fused (with their SiLU, with the time-embedding
    add), what else, and what was left and why. verbose=True prints it. Parameters stay the same
    objects under the same names.
    backend: the ops.group_norm_silu backend of every GroupNormSiLU ("auto", "triton", "reference")."""
    if backend not in BACKENDS:
        raise ValueError(f"patch_model: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be an nn.Module, got {type(model).__name__}")
    report = PatchReport()
    _patch(model, "", report, backend)
    if verbose:
        print(report)
    return report


def _unpatch(module: nn.Module, prefix: str, restored: List[str]) -> None:
    original_class = getattr(type(module), ORIGINAL_CLASS, None)
    if original_class is not None:
        module.__class__ = original_class
        restored.append(prefix)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qual = qualified(prefix, name)
        original = child.__dict__.get(ORIGINAL)
        if original is not None:
            setattr(module, name, original)
            restored.append(qual)
            child = original
        _unpatch(child, qual, restored)


def unpatch_model(model: nn.Module) -> List[str]:
    """Undo patch_model in place: the original modules (the very objects patch_model replaced) and
    the original block classes come back. Returns the qualified names restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model: model must be an nn.Module, got {type(model).__name__}")
    restored: List[str] = []
    _unpatch(model, "", restored)
    return restored
