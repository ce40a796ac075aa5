"""Ops: one public function per fused op. Each validates its inputs, then dispatches to the fastest
available backend (the C++/CUDA extension cbdm_fast._C, Triton kernels) or to its pure-torch
reference. CBDM_FAST_NO_EXT=1 disables the extension; CBDM_FAST_CHECKS=1 adds host-syncing checks
on CUDA inputs."""
from ._extension import available as extension_available
from .ddpm_step import ddpm_step, ddpm_step_reference

__all__ = ["ddpm_step", "ddpm_step_reference", "extension_available"]
