"""ADA augmentation as one batched warp on the device: the authors' Karras pipeline (utils/augmentation.py
of their repository, ``KarrasAugmentationPipeline(0.12)``), vectorised over the batch.

Per image, with p the augmentation probability (0.12), s = 2^0.2 (scale), a = 2^0.2 (anisotropy),
tr = 1/8 (translation), and every "do" an independent Bernoulli(p) draw:

    a0 ~ U{0,1}                                  x-flip (always drawn: it replaces RandomHorizontalFlip)
    a1 ~ U{0,1} * do                             y-flip
    a2 ~ N(0,1) * do                             isotropic scale s^a2
    a3 ~ U(-pi, pi) * do                         rotation
    a4 ~ U(-pi, pi) * do,  a5 ~ N(0,1) * do      anisotropic scale a^a5 along the direction a4
    a6, a7 ~ N(0,1) * do                         translation (tr W a6, tr H a7)

    M = T(W/2 - 1/2, H/2 - 1/2) S(1 - 2 a0, 1) S(1, 1 - 2 a1) S(s^a2, s^a2) R(-a3) R(a4) S(a^a5, a^-a5) R(-a4)
        T(tr W a6, tr H a7) T(-W/2 + 1/2, -H/2 + 1/2)                      (acting on pixel (x, y, 1))
    out(p) = in(M^-1 p), bicubic, mirrored about the edge pixels' centres
    cond   = [a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7]  (the model's 9-dim augm input)

The matrices, the probabilities and the conditioning vector are the authors'. The resampling is
``F.grid_sample(mode="bicubic", padding_mode="reflection", align_corners=True)`` with sample points
in pixel units, so the border rule is scikit-image's / numpy's "reflect" (mirrored about the edge
pixels' centres) as in their ``transform.warp(..., order=3, mode="reflect")``; the cubic kernel
differs slightly from scikit-image's order-3 interpolation (it changes how augmented pixels are
resampled, not which augmentations are drawn; tests/data/test_ada.py compares against an order-3 spline).
Identity transforms (no augmentation drawn, a0 = 0) return the image unchanged (tested).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ada_params", "ada_matrices", "ada_warp", "ada_augment", "ADA_PROB"]

ADA_PROB = 0.12
SCALE_STD = 0.2      # log2 of s and a: s = a = 2 ** 0.2
TRANSLATE = 1.0 / 8  # tr


def ada_params(B: int, p: float = ADA_PROB, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The 8 random parameters a0..a7 of B images, (B, 8) float32, drawn on ``device``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ADA probability must be in [0, 1], got {p}")
    g = dict(device=device, generator=generator)

    def do():
        return (torch.rand(B, **g) < p).float()

    a0 = torch.randint(2, (B,), **g).float()
    a1 = torch.randint(2, (B,), **g).float() * do()
    a2 = torch.randn(B, **g) * do()
    a3 = (torch.rand(B, **g) * 2 * math.pi - math.pi) * do()
    d4 = do()
    a4 = (torch.rand(B, **g) * 2 * math.pi - math.pi) * d4
    a5 = torch.randn(B, **g) * d4
    d6 = do()
    a6 = torch.randn(B, **g) * d6
    a7 = torch.randn(B, **g) * d6
    return torch.stack([a0, a1, a2, a3, a4, a5, a6, a7], dim=1)


def ada_cond(a: torch.Tensor) -> torch.Tensor:
    """The 9-dim conditioning vector of the model's augm embedding, from ada_params."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a.unbind(1)
    return torch.stack([a0, a1, a2, a3.cos() - 1, a3.sin(), a5 * a4.cos(), a5 * a4.sin(), a6, a7], dim=1)


def _translate(tx, ty):
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return torch.stack([torch.stack([one, zero, tx], -1), torch.stack([zero, one, ty], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def _scale(sx, sy):
    one, zero = torch.ones_like(sx), torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def _rotate(theta):
    c, s = theta.cos(), theta.sin()
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def ada_matrices(a: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """M of every image (B, 3, 3) float32, in pixel coordinates (x = column, y = row)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a.unbind(1)
    W = torch.full_like(a0, float(width))
    H = torch.full_like(a0, float(height))
    s = torch.full_like(a0, 2.0 ** SCALE_STD)
    one = torch.ones_like(a0)
    chain = [_translate(W / 2 - 0.5, H / 2 - 0.5), _scale(1 - 2 * a0, one), _scale(one, 1 - 2 * a1),
             _scale(s ** a2, s ** a2), _rotate(-a3), _rotate(a4), _scale(s ** a5, s ** -a5), _rotate(-a4),
             _translate(TRANSLATE * W * a6, TRANSLATE * H * a7), _translate(-W / 2 + 0.5, -H / 2 + 0.5)]
    m = chain[0]
    for nxt in chain[1:]:
        m = m @ nxt
    return m


def ada_warp(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """out(p) = x(M^-1 p) for each image: bicubic, reflected borders; x float (B, C, H, W)."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"ada_warp: x must be a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    B, _, H, W = x.shape
    if mats.shape != (B, 3, 3):
        raise ValueError(f"ada_warp: mats must be ({B}, 3, 3), got {tuple(mats.shape)}")
    # inv_ex: no singularity check, so no host sync on the training hot path (M is a product of
    # invertible scalings, rotations and translations); float64 for B tiny 3x3 systems is free
    inv = torch.linalg.inv_ex(mats.double()).inverse.float()
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=torch.float32),
                            torch.arange(W, device=x.device, dtype=torch.float32), indexing="ij")
    p = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, H * W, 3)
    src = p @ inv.transpose(1, 2)  # (B, HW, 3): source pixel of every output pixel
    # align_corners=True: pixel i -> 2 i / (n - 1) - 1, and reflection about pixels 0 and n - 1
    gx = 2 * src[..., 0] / max(W - 1, 1) - 1
    gy = 2 * src[..., 1] / max(H - 1, 1) - 1
    grid = torch.stack([gx, gy], -1).reshape(B, H, W, 2)
    out = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    return out.to(x.dtype)


def ada_augment(x: torch.Tensor, p: float = ADA_PROB, generator: Optional[torch.Generator] = None,
                global_batch: Optional[int] = None, part: Optional[slice] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented x, cond (B, 9)) for a float batch x (B, C, H, W) on any device, in one batched warp.

    Data parallel: x is rank's ``part`` (a slice) of a global batch of ``global_batch`` images; the
    parameters are drawn for the whole global batch (every rank's generator is in the same state, so
    all draw the same) and this rank keeps its rows, so the union over ranks is the one-process batch.
    """
    if global_batch is None:
        a = ada_params(x.shape[0], p, device=x.device, generator=generator)
    else:
        a = ada_params(global_batch, p, device=x.device, generator=generator)[part]
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"part {part} of a global batch of {global_batch} has {a.shape[0]} rows, "
                             f"but x holds {x.shape[0]} images")
    return ada_warp(x, ada_matrices(a, x.shape[2], x.shape[3])), ada_cond(a)
