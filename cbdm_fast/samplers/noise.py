"""Counter-based per-sample Gaussian noise (``CounterNoise``).

Every Gaussian value is a pure function of (seed, global sample index, draw, element), so a sample
does not depend on the batch size, on its position in a batch, on which batch or rank drew it, or on
the device (up to float32 rounding of log/cos/sin). This is what makes sharded, resumable and
multi-rank sampling give the images of one uninterrupted single-process run.
"""
from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15   # SplitMix64's increment (odd: position -> state is a bijection)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
PAIR_BITS, SAMPLE_BITS, DRAW_BITS = 21, 26, 16  # 21 + 26 + 16 = 63: positions stay non-negative int64
MAX_PAIRS, MAX_SAMPLES, MAX_DRAWS = 1 << PAIR_BITS, 1 << SAMPLE_BITS, 1 << DRAW_BITS


def _signed64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def mix64_py(z: int) -> int:
    """SplitMix64's output function on a Python int (the exact reference of ``_mix64``)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """mix64_py on an int64 tensor: products wrap modulo 2^64 (two's complement), and the logical right
    shifts are arithmetic shifts with the sign-extended bits masked off."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _signed64(_MIX1)
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _signed64(_MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def check_indices(index: torch.Tensor) -> None:
    """ValueError unless every global sample index lies in [0, MAX_SAMPLES): outside, its bits would run
    into the draw's (or, negative, sign-extend over them) and silently reuse other samples' noise. The
    samplers call it once per batch (a host read when ``index`` is on a GPU)."""
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= MAX_SAMPLES:
            raise ValueError(f"sample indices must lie in [0, {MAX_SAMPLES}) (2^26, the counter-based noise's "
                             f"index bits), got [{lo}, {hi}]")


def noise_key(seed: int) -> int:
    """The seed's stream offset (a signed int64)."""
    return _signed64(mix64_py(mix64_py(int(seed) ^ 0x5EED_CBD0_0000_0001)))


class CounterNoise:
    """Gaussian noise that is a pure function of (seed, global sample index, draw, element).

    Design: SplitMix64 evaluated at an arbitrary position (counter-based, like Philox). For element
    pair p of sample i in draw d, the position is ``d << 47 | i << 21 | p`` (21 + 26 + 16 = 63 bits);
    the 64 random bits are ``mix64(position * GAMMA + key(seed))`` -- i.e. the SplitMix64 stream of the
    seed at that position, so distinct (draw, sample, pair) never share bits. The top 24 bits give
    u1 in (0, 1], the next 24 bits u2 in [0, 1); Box-Muller gives the two normals
    ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)`` of elements 2p and 2p+1 (float32; |z| <= 5.77).

    Draws: 0 is x_T; t + 1 is the noise added when leaving timestep t (DDPM and DDIM alike), so DDIM
    with eta = 1 over all T steps uses exactly DDPM's noise.

    Cost: about 20 elementwise int64/float ops over (B, numel/2), vectorised over the batch (no
    per-sample Python loop, no generator state). ``draw`` may be a device tensor, so the whole draw
    is capturable in a CUDA graph and replayable with the draw index fed through a device buffer.
    Limits: numel/2 < 2^21 per sample, sample indices < 2^26, draws < 2^16 (T < 65535).
    """

    def __init__(self, seed: int, shape, device=None):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        self.seed, self.shape = seed, tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.pairs = (self.numel + 1) // 2
        if not 1 <= self.pairs <= MAX_PAIRS:
            raise ValueError(f"CounterNoise: a sample of shape {self.shape} has {self.numel} elements; "
                             f"at most {2 * MAX_PAIRS} are supported")
        self.key = noise_key(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._pair = torch.arange(self.pairs, dtype=torch.int64, device=self.device)

    def bits(self, index: torch.Tensor, draw) -> torch.Tensor:
        """(B, pairs) int64: the random bits of every element pair."""
        if isinstance(draw, int) and not 0 <= draw < MAX_DRAWS:
            raise ValueError(f"draw must lie in [0, {MAX_DRAWS}), got {draw}")
        if isinstance(draw, torch.Tensor):
            draw = draw.reshape(-1)[:1]  # a (1,) device tensor: no host sync
        base = ((draw << (SAMPLE_BITS + PAIR_BITS)) | (index.to(torch.int64) << PAIR_BITS))
        if isinstance(base, torch.Tensor):
            base = base.view(-1, 1)
        position = base | self._pair.view(1, -1)
        return _mix64(position * _signed64(_GAMMA) + self.key)

    def __call__(self, index: torch.Tensor, draw) -> torch.Tensor:
        """(B, *shape) float32 standard normal noise for the global sample indices ``index`` (B,) and
        the draw ``draw`` (a Python int, or a 1-element int64 tensor on the noise's device)."""
        z = self.bits(index, draw)
        u1 = (((z >> 40) & 0xFFFFFF) + 1).float() * (2.0 ** -24)      # (0, 1]: log is finite
        u2 = ((z >> 16) & 0xFFFFFF).float() * (2.0 ** -24 * 2 * math.pi)
        r = torch.sqrt(-2.0 * torch.log(u1))
        out = torch.stack([r * torch.cos(u2), r * torch.sin(u2)], dim=-1).view(z.shape[0], -1)
        if out.shape[1] != self.numel:
            out = out[:, :self.numel]
        return out.reshape((z.shape[0],) + self.shape)

