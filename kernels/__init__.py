"""Triton kernels, one file per fused op; installed as cbdm_fast.kernels."""
