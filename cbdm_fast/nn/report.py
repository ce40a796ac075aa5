"""What patch_model did, module by module: the structured result it returns and prints (verbose=True).

A PatchReport IS the list of qualified names patch_model replaced (as it always returned), and also
holds one PatchedModule per module it worked on: which GroupNorms now run through
ops.group_norm_silu (FusedNorm: with the SiLU after it, with the time-embedding add before it, or
the norm alone), what else was fused, and what was left as it was, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Tuple

__all__ = ["FusedNorm", "PatchedModule", "PatchReport", "qualified"]


def qualified(prefix: str, name: str) -> str:
    """The qualified module name of child `name` under `prefix` ("" is the root)."""
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class FusedNorm:
    """One GroupNorm now run by ops.group_norm_silu."""
    name: str           # its qualified name
    act: bool = False   # the SiLU after it runs in the same op (a GroupNorm->SiLU pair fused)
    add: bool = False   # the time-embedding add before it runs in the same op

    def describe(self, owner: str = "") -> str:
        """add+<name>+SiLU, <name>+SiLU or <name> (norm only); <name> relative to module `owner`."""
        name = self.name[len(owner) + 1:] if owner and self.name.startswith(owner + ".") else self.name
        return ("add+" if self.add else "") + name + ("+SiLU" if self.act else " (norm only)")


@dataclass(frozen=True)
class PatchedModule:
    """What patch_model did to one module (name "" is the root)."""
    name: str
    kind: str                          # its class name before patching
    replaced: Tuple[str, ...] = ()     # qualified names of the modules swapped (or class-swapped)
    norms: Tuple[FusedNorm, ...] = ()  # its GroupNorms now fused
    fused: Tuple[str, ...] = ()        # anything else now fused, in words
    left: Tuple[str, ...] = ()         # what still runs as before, and why

    def __str__(self) -> str:
        done = [n.describe(self.name) for n in self.norms] + list(self.fused)
        line = f"{self.name or '<root>'} ({self.kind}): " + (", ".join(done) or "nothing fused")
        return line + "".join(f"; left: {why}" for why in self.left)


class PatchReport(List[str]):
    """The qualified names patch_model replaced, in order (a plain list to compare and iterate, as
    before), with ``.modules``: one PatchedModule per module patched, in the order visited."""

    def __init__(self, modules: Iterable[PatchedModule] = ()):
        super().__init__()
        self.modules: List[PatchedModule] = []
        for m in modules:
            self.record(m)

    def record(self, module: PatchedModule) -> None:
        self.modules.append(module)
        self.extend(module.replaced)

    def module(self, name: str) -> PatchedModule:
        """The entry of the module with this qualified name (KeyError when it was not patched)."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"patch_model did not patch a module named {name!r}")

    @property
    def norms(self) -> List[FusedNorm]:
        return [n for m in self.modules for n in m.norms]

    @property
    def pairs_fused(self) -> int:
        """GroupNorm->SiLU pairs now one op."""
        return sum(n.act for n in self.norms)

    @property
    def adds_fused(self) -> int:
        """Time-embedding adds now inside the norm's op."""
        return sum(n.add for n in self.norms)

    @property
    def left(self) -> List[Tuple[str, str]]:
        """(module name, why) for everything left as it was."""
        return [(m.name, why) for m in self.modules for why in m.left]

    def summary(self) -> str:
        return (f"patch_model: {len(self.norms)} GroupNorms fused ({self.pairs_fused} with their SiLU, "
                f"{self.adds_fused} with the time-embedding add) in {len(self.modules)} modules; "
                f"{len(self.left)} things left as they were")

    def __str__(self) -> str:
        return "\n".join([self.summary()] + [f"  {m}" for m in self.modules])
