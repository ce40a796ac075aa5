"""The in-place swaps every patch_model rule is made of, each one undoable by unpatch_model.

  * replace: a child becomes another module (a FusedAttnBlock, say).
  * fuse_norm: an nn.GroupNorm child becomes a GroupNormSiLU holding the same Parameter objects.
  * fuse_activation: an activation child whose work moved into the GroupNormSiLU before it becomes
    an nn.Identity.
  * swap_forward: a module's class becomes a subclass of its own class with another forward
    (isinstance still holds, so the code around it keeps working).
Each replacement keeps what it replaced in a hidden attribute (not a submodule, not in the state
dict): ORIGINAL on a swapped-in module, ORIGINAL_CLASS on a swapped class.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch import nn

from .norm import GroupNormSiLU

__all__ = ["ORIGINAL", "ORIGINAL_CLASS", "is_activation", "replace", "fuse_norm", "fuse_activation",
           "swap_forward"]

ORIGINAL = "_cbdm_original"
ORIGINAL_CLASS = "_cbdm_original_class"
_ACT_NAMES = ("Swish", "SiLU")


def is_activation(m) -> bool:
    """nn.SiLU, or any module whose class is named Swish or SiLU (the authors' Swish)."""
    return isinstance(m, nn.SiLU) or type(m).__name__ in _ACT_NAMES


def replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    """parent.<name> becomes new, which keeps the module it replaces for unpatch_model."""
    object.__setattr__(new, ORIGINAL, getattr(parent, name))  # not registered: no submodule, no state dict
    setattr(parent, name, new)


def fuse_norm(parent: nn.Module, name: str, act: bool, backend: str) -> None:
    """parent.<name> (an nn.GroupNorm) becomes a GroupNormSiLU sharing its weight and bias."""
    replace(parent, name, GroupNormSiLU.from_group_norm(getattr(parent, name), act=act, backend=backend))


class FusedActIdentity(nn.Identity):
    """nn.Identity standing where an activation was (now fused into the GroupNormSiLU before it)."""


def fuse_activation(parent: nn.Module, name: str) -> None:
    """parent.<name> (an activation now applied by the fused norm before it) becomes an identity."""
    replace(parent, name, FusedActIdentity())


_FUSED_CLASSES: Dict[Tuple[type, Callable], type] = {}


def swap_forward(module: nn.Module, forward: Callable, what: str) -> None:
    """module's class becomes Fused<Class>, a subclass of its class whose forward is `forward` (one
    subclass per (class, forward)); `what` says in its docstring what the forward fuses."""
    cls = type(module)
    fused = _FUSED_CLASSES.get((cls, forward))
    if fused is None:
        fused = type(f"Fused{cls.__name__}", (cls,), {
            "forward": forward, ORIGINAL_CLASS: cls, "__module__": forward.__module__,
            "__doc__": f"{cls.__qualname__} with {what} (cbdm_fast.nn.patch_model)."})
        _FUSED_CLASSES[(cls, forward)] = fused
    module.__class__ = fused
