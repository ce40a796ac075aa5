"""Setup of cb_loss: torch: ops.cb_loss_reference (the ops of losses.cbdm_terms); fused: ops.cb_loss(backend=
"triton"), on h = out[:B] and h_bal = out[B:], the halves of one 2B network output (as the fused step
passes them), tau 1 and a 0-dim keep = 1.

Bytes (n = B*3*H*W, e = the element size, B batch):
    fwd   read h, h_bal, noise                     3 n e + 8 B
    bwd   read h, h_bal, noise, write dh, dh_bal   5 n e + 8 B
"""
from __future__ import annotations

import torch

from cbdm_fast import ops

from .case import T, OpCase, Runner, compiled, generator, image_shape, numel_and_size, randn, with_full

TAU = 1.0


def cases(size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    shape = image_shape(size)
    B = shape[0]
    n, e = numel_and_size(shape, dtype)
    g = generator(seed)
    out = randn((2 * B,) + shape[1:], g, device, dtype, layout, grad=True)  # the network's 2B output
    noise = randn(shape, g, device, dtype, layout)
    t = torch.randint(0, T, (B,), generator=g).to(device)
    keep = torch.ones((), device=device)  # the fused training step's 0-dim keep
    g1 = torch.ones((), device=device)
    nbytes = with_full({"fwd": 3 * n * e + 8 * B, "bwd": 5 * n * e + 8 * B})

    def make(provider):
        if provider == "fused":
            fn = lambda: ops.cb_loss(out[:B], out[B:], noise, t, T, TAU, keep=keep, backend="triton")
        else:
            f = ops.cb_loss_reference if provider == "torch" else compiled(ops.cb_loss_reference)
            fn = lambda: f(out[:B], out[B:], noise, t, T, TAU, keep)
        return Runner(fn, (out,), ("out",))

    return [OpCase("cb_loss", shape, dtype, layout, device, nbytes, make, grad_outputs=(g1, g1.clone()),
                   note="h = out[:B], h_bal = out[B:] of one 2B output; tau 1, keep = 1")]
