"""Setup of q_sample at the training batch: torch: ops.q_sample_reference; fused: ops.q_sample(backend="triton").

Inputs: x_0 and noise (the given layout, both require grad), t uniform in [0, T).
Bytes (n = elements of x_0, e = its element size, B batch):
    fwd   read x_0, noise, write x_t       3 n e + 8 B (t)
    bwd   read g, write dx_0, dnoise       3 n e + 8 B
"""
from __future__ import annotations

import torch

from cbdm_fast import ops
from cbdm_fast.schedule import Schedule

from .case import T, OpCase, Runner, compiled, generator, image_shape, numel_and_size, randn, with_full


def cases(size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    shape = image_shape(size)
    B = shape[0]
    n, e = numel_and_size(shape, dtype)
    g = generator(seed)
    sched = Schedule(T, device=device)
    x0 = randn(shape, g, device, dtype, layout, grad=True)
    noise = randn(shape, g, device, dtype, layout, grad=True)
    t = torch.randint(0, T, (B,), generator=g).to(device)
    dy = randn(shape, g, device, dtype, layout)
    sa, s1a = sched.sqrt_alphas_bar, sched.sqrt_one_minus_alphas_bar
    nbytes = with_full({"fwd": 3 * n * e + 8 * B, "bwd": 3 * n * e + 8 * B})

    def make(provider):
        if provider == "fused":
            fn = lambda: ops.q_sample(x0, t, noise, sa, s1a, backend="triton")
        else:
            f = ops.q_sample_reference if provider == "torch" else compiled(ops.q_sample_reference)
            fn = lambda: f(x0, t, noise, sa, s1a)
        return Runner(fn, (x0, noise), ("x_0", "noise"))

    return [OpCase("q_sample", shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,))]
