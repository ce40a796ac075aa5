"""Ops: one public function per fused op. Each validates its inputs, then dispatches to the fastest
available backend (the C++/CUDA extension cbdm_fast._C, Triton kernels) or to its pure-torch
reference, and is registered with torch.library so that torch.compile sees no graph break.
What the ops share (environment flags, Triton availability, argument checks, layouts) is in
_common.py, the access to the extension in _extension.py. CBDM_FAST_NO_EXT=1 disables the
extension; CBDM_FAST_CHECKS=1 adds host-syncing checks on CUDA inputs."""
from ._extension import available as extension_available
from .cb_loss import cb_loss, cb_loss_reference
from .ddim_step import ddim_step, ddim_step_reference
from .ddpm_step import ddpm_step, ddpm_step_reference
from .dpm_step import dpm_step, dpm_step_reference
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .q_sample import q_sample, q_sample_reference

__all__ = [
    "cb_loss", "cb_loss_reference", "ddim_step", "ddim_step_reference", "ddpm_step", "ddpm_step_reference",
    "dpm_step", "dpm_step_reference", "extension_available", "group_norm_silu", "group_norm_silu_reference",
    "q_sample", "q_sample_reference",
]
