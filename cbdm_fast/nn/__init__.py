"""Modules built on cbdm_fast.ops: GroupNormSiLU, FusedAttnBlock, and patch_model / unpatch_model,
which swap them into any model in place (parameters shared, state-dict keys unchanged) and report
what they fused (PatchReport)."""
from .attention import FusedAttnBlock
from .norm import GroupNormSiLU
from .patch import patch_model, unpatch_model
from .report import FusedNorm, PatchedModule, PatchReport

__all__ = ["FusedAttnBlock", "GroupNormSiLU", "patch_model", "unpatch_model", "FusedNorm", "PatchedModule",
           "PatchReport"]
