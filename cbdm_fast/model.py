"""The DDPM CIFAR UNet as the CBDM authors use it: same modules, same parameter names, same init.

Their state dicts (and the net_model / ema_model entries of their ckpt_*.pt files) load into this
class with strict=True. Modules are built in the authors' order and initialised with the same calls,
so a given torch seed gives the same initial weights as their code.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import init
from torch.nn import functional as F

GROUPS = 32  # every GroupNorm of the network has 32 groups


class Swish(nn.Module):
    """x * sigmoid(x) (SiLU)."""

    def forward(self, x):
        return F.silu(x)


def sinusoidal_table(T: int, d_model: int) -> torch.Tensor:
    """(T, d_model) table: interleaved [sin(t w_i), cos(t w_i)], w_i = 10000^(-2i/d_model)."""
    freqs = torch.exp(-(torch.arange(0, d_model, step=2) / d_model * math.log(10000)))
    angles = torch.arange(T).float()[:, None] * freqs[None, :]
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).view(T, d_model)


class TimeEmbedding(nn.Module):
    """t -> sinusoidal(ch) -> Linear(ch, 4ch) -> Swish -> Linear(4ch, 4ch). The table is frozen."""

    def __init__(self, T: int, d_model: int, dim: int):
        super().__init__()
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(sinusoidal_table(T, d_model)),
            nn.Linear(d_model, dim),
            Swish(),
            nn.Linear(dim, dim),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)

    def forward(self, t):
        return self.timembedding(t)


class DownSample(nn.Module):
    """3x3 convolution with stride 2."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(x)


class UpSample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=1, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(GROUPS, in_ch)
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1)
        self.proj = nn.Conv2d(in_ch, in_ch, 1)
        for module in (self.proj_q, self.proj_k, self.proj_v, self.proj):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        # The authors set gain 1e-5 here, but the enclosing ResBlock re-initialises every conv with
        # gain 1 afterwards; the call is kept because it consumes the random stream like theirs.
        init.xavier_uniform_(self.proj.weight, gain=1e-5)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x)
        q = self.proj_q(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        k = self.proj_k(h).reshape(B, C, H * W)
        v = self.proj_v(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        w = F.softmax(torch.bmm(q, k) * (int(C) ** (-0.5)), dim=-1)
        h = torch.bmm(w, v).view(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """GN-Swish-Conv, + Linear(Swish(temb)), GN-Swish-Dropout-Conv, + shortcut, then optional attention."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.GroupNorm(GROUPS, in_ch),
            Swish(),
            nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1),
        )
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(GROUPS, out_ch),
            Swish(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1),
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
        init.xavier_uniform_(self.block2[-1].weight, gain=1e-5)

    def forward(self, x, temb):
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        h = h + self.shortcut(x)
        return self.attn(h)


class UNet(nn.Module):
    """Noise-prediction UNet eps(x_t, t, y, augm).

    y=None: unconditional (the label embedding is not added; there is no null token).
    augm: the 9-dim ADA conditioning vector, added through a bias-free Linear when augm=True.
    """

    # forward takes y_mask (per-sample label drop), so a sampler can run the conditional and the
    # unconditional pass of classifier-free guidance as one batch (samplers.guidance)
    takes_label_mask = True

    def __init__(self, T: int = 1000, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 attn: Sequence[int] = (1,), num_res_blocks: int = 2, dropout: float = 0.1,
                 cond: bool = True, augm: bool = False, num_class: int = 100, in_ch: int = 3):
        super().__init__()
        _check_config(T, ch, ch_mult, attn, num_res_blocks, dropout, num_class, in_ch)
        self.config = dict(T=T, ch=ch, ch_mult=list(ch_mult), attn=list(attn),
                           num_res_blocks=num_res_blocks, dropout=dropout, cond=cond,
                           augm=augm, num_class=num_class, in_ch=in_ch)
        self.num_class, self.in_ch = num_class, in_ch
        tdim = ch * 4
        self.time_embedding = TimeEmbedding(T, ch, tdim)
        self.label_embedding = nn.Embedding(num_class, tdim) if cond else None
        self.augm_embedding = nn.Linear(9, tdim, bias=False) if augm else None

        self.head = nn.Conv2d(in_ch, ch, kernel_size=3, stride=1, padding=1)
        self.downblocks = nn.ModuleList()
        chs = [ch]  # channels of every skip connection, consumed by the up path
        now_ch = ch
        for i, mult in enumerate(ch_mult):
            out_ch = ch * mult
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now_ch, out_ch, tdim, dropout, attn=(i in attn)))
                now_ch = out_ch
                chs.append(now_ch)
            if i != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch))
                chs.append(now_ch)

        self.middleblocks = nn.ModuleList([
            ResBlock(now_ch, now_ch, tdim, dropout, attn=True),
            ResBlock(now_ch, now_ch, tdim, dropout, attn=False),
        ])

        self.upblocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            out_ch = ch * mult
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(chs.pop() + now_ch, out_ch, tdim, dropout, attn=(i in attn)))
                now_ch = out_ch
            if i != 0:
                self.upblocks.append(UpSample(now_ch))

        self.tail = nn.Sequential(
            nn.GroupNorm(GROUPS, now_ch),
            Swish(),
            nn.Conv2d(now_ch, in_ch, 3, stride=1, padding=1),
        )
        init.xavier_uniform_(self.head.weight)
        init.zeros_(self.head.bias)
        init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)
        init.zeros_(self.tail[-1].bias)

    def embed(self, t, y=None, augm=None, y_mask=None):
        """temb = TimeEmbedding(t) [+ y_mask * LabelEmbedding(y)] [+ AugmEmbedding(augm)].

        y_mask (B,), optional: multiplies each sample's label embedding, so 0 makes that sample
        unconditional exactly as y=None does for a whole batch (per-sample label drop).
        """
        temb = self.time_embedding(t)
        if y is not None and self.label_embedding is not None:
            label = self.label_embedding(y)
            if y_mask is not None:
                label = label * y_mask.to(label.dtype)[:, None]
            temb = temb + label
        if augm is not None and self.augm_embedding is not None:
            temb = temb + self.augm_embedding(augm)
        return temb

    def forward(self, x, t, y=None, augm=None, y_mask=None):
        if not torch.compiler.is_compiling():
            self._check_inputs(x, t, y, augm, y_mask)
        temb = self.embed(t, y, augm, y_mask)
        h = self.head(x)
        hs = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            hs.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)

    def _check_inputs(self, x, t, y, augm, y_mask):
        """Shape checks always; value checks only on CPU tensors (on a GPU they would sync)."""
        if x.ndim != 4 or x.shape[1] != self.in_ch:
            raise ValueError(f"x must have shape (B, {self.in_ch}, H, W), got {tuple(x.shape)}")
        down = 2 ** (len(self.config["ch_mult"]) - 1)
        if x.shape[2] % down or x.shape[3] % down:
            raise ValueError(f"x's height and width must be multiples of {down}, got {tuple(x.shape[2:])}")
        B = x.shape[0]
        if t.ndim != 1 or t.shape[0] != B or t.is_floating_point():
            raise ValueError(f"t must be an integer tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
        if y is not None:
            if y.ndim != 1 or y.shape[0] != B or y.is_floating_point():
                raise ValueError(f"y must be an integer tensor of shape ({B},), got {y.dtype} {tuple(y.shape)}")
            if self.label_embedding is not None and y.device.type == "cpu" and y.numel():
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= self.num_class:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"label {bad} out of range: this model has num_class={self.num_class}")
        if t.device.type == "cpu" and t.numel():
            T = self.config["T"]
            if int(t.min()) < 0 or int(t.max()) >= T:
                raise ValueError(f"timesteps must lie in [0, {T}), got min {int(t.min())} max {int(t.max())}")
        if y_mask is not None and tuple(y_mask.shape) != (B,):
            raise ValueError(f"y_mask must have shape ({B},), got {tuple(y_mask.shape)}")
        if augm is not None and self.augm_embedding is not None and tuple(augm.shape) != (B, 9):
            raise ValueError(f"augm must have shape ({B}, 9), got {tuple(augm.shape)}")


def _check_config(T, ch, ch_mult, attn, num_res_blocks, dropout, num_class, in_ch):
    if ch <= 0 or ch % GROUPS:
        raise ValueError(f"ch must be a positive multiple of {GROUPS} (GroupNorm groups), got {ch}")
    if not ch_mult or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}")
    if any(not 0 <= i < len(ch_mult) for i in attn):
        raise ValueError(f"attn levels {list(attn)} out of range for ch_mult of length {len(ch_mult)}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_class < 1 or in_ch < 1 or T < 1:
        raise ValueError(f"num_class, in_ch and T must be >= 1, got {num_class}, {in_ch}, {T}")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
