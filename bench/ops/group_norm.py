"""Setups of the three GroupNorm ops, at the UNet's two norm shapes:

    group_norm_silu      torch: F.group_norm -> F.silu            fused: ops.group_norm_silu(backend="triton")
    group_norm_silu_add  torch: x + add[:, :, None, None], then   fused: the same with add=(N, C)
                         F.group_norm -> F.silu
    group_norm           torch: F.group_norm                      fused: ops.group_norm_silu(act=False)

Inputs: x (the given layout), fp32 weight and bias (as the UNet's), add of x's dtype; all require grad.
Bytes (n = elements of x, e = its element size, C channels, N batch):
    fwd   read x, write y          2 n e + 2 C 4 (weight, bias fp32)      (+ read add: N C e)
    bwd   read x, dy, write dx     3 n e + 4 C 4 (read w, b; write dw, db) (+ read add, write dadd: 2 N C e)
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from cbdm_fast import ops

from .case import SHAPES, OpCase, Runner, compiled, generator, numel_and_size, randn, with_full

GROUPS = 32  # the UNet's GroupNorm groups
EPS = 1e-5


def group_norm_torch(x, w, b, add, G: int, eps: float, act: bool):
    u = x if add is None else x + add[:, :, None, None]
    z = F.group_norm(u, G, w, b, eps)
    return F.silu(z) if act else z


def _mixed_group_norm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether F.group_norm takes x's dtype with float32 weight and bias on this device."""
    if x.dtype == w.dtype:
        return True
    try:
        with torch.no_grad():
            F.group_norm(x[:1].detach(), GROUPS, w.detach(), w.detach(), EPS)
        return True
    except Exception:
        return False


def cases(op: str, size: str, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> list[OpCase]:
    act = op != "group_norm"
    with_add = op == "group_norm_silu_add"
    out = []
    for k, shape in enumerate(SHAPES[size]["norm"]):
        g = generator(seed + k)
        N, C = shape[:2]
        n, e = numel_and_size(shape, dtype)
        x = randn(shape, g, device, dtype, layout, grad=True)
        w = randn((C,), g, device, torch.float32, scale=0.2, offset=1.0, grad=True)
        b = randn((C,), g, device, torch.float32, scale=0.2, grad=True)
        add = randn((N, C), g, device, dtype, grad=True) if with_add else None
        dy = randn(shape, g, device, dtype, layout)
        leaves = (x, w, b) + ((add,) if with_add else ())
        names = ("x", "weight", "bias") + (("add",) if with_add else ())
        nbytes = with_full({"fwd": 2 * n * e + 2 * C * 4 + (N * C * e if with_add else 0),
                            "bwd": 3 * n * e + 4 * C * 4 + (2 * N * C * e if with_add else 0)})
        note = None
        if not _mixed_group_norm_ok(x, w):
            note = "torch/compiled: weight and bias cast to x's dtype (F.group_norm rejects mixed dtypes here)"

        def make(provider, x=x, w=w, b=b, add=add, leaves=leaves, names=names, note=note):
            if provider == "fused":
                fn = lambda: ops.group_norm_silu(x, w, b, GROUPS, EPS, add=add, act=act, backend="triton")
                return Runner(fn, leaves, names)
            if note is not None:  # leaves of x's dtype stand in for the fp32 weight and bias
                wt = w.detach().to(x.dtype).requires_grad_()
                bt = b.detach().to(x.dtype).requires_grad_()
                leaves = (x, wt, bt) + leaves[3:]
                w, b = wt, bt
            f = group_norm_torch if provider == "torch" else compiled(group_norm_torch)
            return Runner(lambda: f(x, w, b, add, GROUPS, EPS, act), leaves, names, note)

        out.append(OpCase(op, shape, dtype, layout, device, nbytes, make, grad_outputs=(dy,), note=note))
    return out
