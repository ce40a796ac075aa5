"""Triton kernels, installed as cbdm_fast.kernels: q_sample.py, cb_loss.py, and GroupNorm+SiLU in
group_norm_silu.py (the launchers and the "groups" kernels), group_norm_silu_tiles.py (their tile
arithmetic) and group_norm_silu_rows.py (the "rows" strategy); _common.py what they share."""
