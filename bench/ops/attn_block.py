"""Setup of the attention block at the UNet's attention shape: torch: the authors' model.AttnBlock;
fused: nn.FusedAttnBlock.from_attn_block (one q/k/v GEMM, SDPA) on a copy; compiled: torch.compile of a
copy of the torch block. Weights initialised as the enclosing ResBlock leaves them, with random biases
and norm affine (never identity); x and every parameter require grad.

Bytes (n = elements of x, e = its element size, C channels):
    fwd   read x, the 4 CxC weights, write y       2 n e + 4 C^2 e
    bwd   read x, dy, weights, write dx, dweights  3 n e + 8 C^2 e
Attention is compute-bound, so its rows also give TFLOP/s, from the FLOPs of the 4 1x1 convolutions and
the two attention products: fwd = 8 B L C^2 + 4 B L^2 C (L = H W), bwd = 2 x fwd.
"""
from __future__ import annotations

import copy

import torch

from cbdm_fast.model import AttnBlock
from cbdm_fast.nn.attention import FusedAttnBlock

from .case import SHAPES, OpCase, Runner, compiled, generator, numel_and_size, randn, with_full


def cases(size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    shape = SHAPES[size]["attn"]
    B, C, H, W = shape
    L = H * W
    n, e = numel_and_size(shape, dtype)
    g = generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = AttnBlock(C)
        torch.nn.init.xavier_uniform_(block.proj.weight)  # as the enclosing ResBlock re-initialises it
        for m in (block.proj_q, block.proj_k, block.proj_v, block.proj):
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
        torch.nn.init.uniform_(block.group_norm.weight, 0.8, 1.2)
        torch.nn.init.uniform_(block.group_norm.bias, -0.1, 0.1)
    block = block.to(device=device, dtype=dtype)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
    x = randn(shape, g, device, dtype, layout, grad=True)
    dy = randn(shape, g, device, dtype, layout)
    nbytes = with_full({"fwd": 2 * n * e + 4 * C * C * e, "bwd": 3 * n * e + 8 * C * C * e})
    fwd_flops = 8 * B * L * C * C + 4 * B * L * L * C
    flops = {"fwd": fwd_flops, "bwd": 2 * fwd_flops, "full": 3 * fwd_flops}

    def make(provider):
        if provider == "torch":
            m = block
        elif provider == "fused":
            m = FusedAttnBlock.from_attn_block(copy.deepcopy(block), backend="triton")
        else:
            m = copy.deepcopy(block)
        params = sorted(m.named_parameters())
        names = ("x",) + tuple(k for k, _ in params)
        leaves = (x,) + tuple(p for _, p in params)
        f = compiled(m) if provider == "compiled" else m
        return Runner(lambda: f(x), leaves, names)

    return [OpCase("attn_block", shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,), flops=flops)]
