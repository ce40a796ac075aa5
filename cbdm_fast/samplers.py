"""Ancestral DDPM sampling with classifier-free guidance (SPEC.md, Sampling).

``ddpm_sample`` is the sampler the CLI uses: the per-step update goes through ``ops.ddpm_step``
(the C++/CUDA extension when built, else the torch formula). ``reference_sample`` is the authors'
loop kept verbatim in spirit (fp32, two forwards per step, torch formula) as the baseline that
every faster sampler is tested against.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, Optional

import torch

from .schedule import Schedule, extract

METHODS = ("cfg", "cond", "uncond")


def class_balanced_labels(n_per_class: int, num_class: int, device=None) -> torch.Tensor:
    """Exactly n_per_class labels of every class, class 0 first: [0]*n, [1]*n, ..."""
    return torch.arange(num_class, device=device).repeat_interleave(n_per_class)


def uniform_labels(n: int, num_class: int, generator: Optional[torch.Generator] = None, device=None):
    """n i.i.d. uniform labels, as the authors draw them for evaluation."""
    return torch.randint(num_class, (n,), generator=generator).to(device)


def guided_eps(model, x_t, t, y, omega: float, method: str):
    """Returns (eps_c, eps_u): eps_u is None unless method == 'cfg' and omega > 0.

    As in the authors' sampler, the conditional pass gets a zero ADA vector (when the model has an
    ADA embedding) and the unconditional pass gets none.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    augm = None
    if getattr(model, "augm_embedding", None) is not None:
        augm = torch.zeros(x_t.shape[0], 9, device=x_t.device, dtype=x_t.dtype)
    y_c = None if method == "uncond" else y
    eps_c = model(x_t, t, y=y_c, augm=augm)
    eps_u = model(x_t, t, y=None, augm=None) if (method == "cfg" and omega > 0) else None
    return eps_c, eps_u


def batched_guided_eps(model, x_t, t, y, omega: float, method: str):
    """guided_eps with the conditional and unconditional passes as ONE forward of 2B.

    The second half gets y_mask = 0, which is exactly the unconditional pass (the label embedding
    is multiplied by 0); GroupNorm is per sample, so nothing mixes between the halves. A zero ADA
    vector on both halves equals the authors' (zeros, None) pair because that embedding has no bias.
    Falls back to guided_eps when there is no unconditional pass to batch.
    """
    if not (method == "cfg" and omega > 0):
        return guided_eps(model, x_t, t, y, omega, method)
    B = x_t.shape[0]
    mask = torch.cat([torch.ones(B, device=x_t.device), torch.zeros(B, device=x_t.device)])
    augm = None
    if getattr(model, "augm_embedding", None) is not None:
        augm = torch.zeros(2 * B, 9, device=x_t.device, dtype=x_t.dtype)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, y]), augm=augm, y_mask=mask)
    return out[:B], out[B:]


def _supports_label_mask(model) -> bool:
    return "y_mask" in inspect.signature(model.forward).parameters


def _check_sampling_args(model, x_T, y, method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "uncond":
        if y is None:
            raise ValueError(f"method {method!r} needs labels y")
        if y.shape != (x_T.shape[0],):
            raise ValueError(f"y must have shape ({x_T.shape[0]},), got {tuple(y.shape)}")
        if getattr(model, "label_embedding", 1) is None:
            raise ValueError(f"method {method!r} needs a conditional model (this one has cond=False)")


@torch.no_grad()
def ddpm_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                omega: float = 0.0, method: str = "cfg", var_type: str = "fixedlarge",
                clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                backend: str = "auto", progress: Optional[Callable[[int], None]] = None,
                batch_guidance: Optional[bool] = None,
                noise_fn: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """Ancestral sampling from x_T over all T steps; returns x_0 clipped to [-1, 1].

    eps = eps_c + omega (eps_c - eps_u) (classifier-free guidance); the step
    x_{t-1} = coef1 x0_pred + coef2 x_t + sigma_t z (z = 0 at t = 0) runs in ops.ddpm_step.
    clip_x0=False is the authors' behaviour (their clip line has no effect); True clips x0_pred.
    Noise is drawn from ``generator`` (on x_T's device) so a run is reproducible, or, when given, from
    ``noise_fn(t)``: the noise added when leaving timestep t (e.g. ``CounterNoise``, per sample).
    batch_guidance (default: when the model takes ``y_mask``, as our UNet does) runs the conditional
    and unconditional passes as one forward of 2B (``batched_guided_eps``).
    """
    from . import ops

    _check_sampling_args(model, x_T, y, method)
    if batch_guidance is None:
        batch_guidance = _supports_label_mask(model)
    eps_fn = batched_guided_eps if batch_guidance else guided_eps
    table = schedule.sampling_table(var_type).to(x_T.device)
    x_t = x_T.float().clone()
    for step in reversed(range(schedule.T)):
        t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
        eps_c, eps_u = eps_fn(model, x_t, t, y, omega, method)
        if step == 0:
            noise = torch.zeros_like(x_t)
        elif noise_fn is not None:
            noise = noise_fn(step)
        else:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device)
        x_t = ops.ddpm_step(x_t, eps_c.float(), None if eps_u is None else eps_u.float(), t, noise,
                            table, omega=omega, clip_x0=clip_x0, backend=backend)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)


@torch.no_grad()
def reference_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                     omega: float = 0.0, method: str = "cfg", var_type: str = "fixedlarge",
                     clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                     noise_fn: Optional[Callable[[int], torch.Tensor]] = None,
                     progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The authors' sampling loop (GaussianDiffusionSampler), step by step in torch; the baseline.

    The only addition: the noise of the step leaving timestep t may come from ``noise_fn(t)``
    (per-sample counter-based noise) instead of ``torch.randn(generator=generator)``."""
    _check_sampling_args(model, x_T, y, method)
    log_var = schedule.log_variance(var_type)
    x_t = x_T.float().clone()
    for step in reversed(range(schedule.T)):
        x_t = reference_step(model, schedule, log_var, x_t, step, y, omega, method, clip_x0, generator, noise_fn)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)


def reference_step(model, schedule: Schedule, log_var: torch.Tensor, x_t: torch.Tensor, step: int, y, omega: float,
                   method: str, clip_x0: bool, generator: Optional[torch.Generator] = None,
                   noise_fn: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """One step of the authors' loop (``reference_sample``'s body; the benchmark times it on its own)."""
    t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
    eps, eps_u = guided_eps(model, x_t, t, y, omega, method)
    if eps_u is not None:
        eps = eps + omega * (eps - eps_u)
    x_0 = (extract(schedule.sqrt_recip_alphas_bar, t, x_t.ndim) * x_t
           - extract(schedule.sqrt_recipm1_alphas_bar, t, x_t.ndim) * eps)
    if clip_x0:
        x_0 = x_0.clamp(-1.0, 1.0)
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x_0
            + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
    if step == 0:
        noise = 0
    elif noise_fn is not None:
        noise = noise_fn(step)
    else:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return mean + torch.exp(0.5 * extract(log_var, t, x_t.ndim)) * noise


# ============================================================================ per-sample noise
# Counter-based noise: every Gaussian value is a pure function of (seed, global sample index, draw,
# element), so a sample does not depend on the batch size, on its position in a batch, on which batch
# it was in, or on the device (up to float32 rounding of log/cos/sin). See CounterNoise.
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


def noise_key(seed: int) -> int:
    """The seed's stream offset (a signed int64)."""
    return _signed64(mix64_py(mix64_py(int(seed) ^ 0x5EED_CBD0_0000_0001)))


def counter_bits_py(seed: int, sample: int, draw: int, pair: int) -> int:
    """The 64 random bits of one element pair, in pure Python (the reference the tests compare against)."""
    position = (draw << (SAMPLE_BITS + PAIR_BITS)) | (sample << PAIR_BITS) | pair
    return mix64_py(position * _GAMMA + noise_key(seed))


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

    @staticmethod
    def check_indices(first: int, stop: int) -> None:
        if not 0 <= first <= stop <= MAX_SAMPLES:
            raise ValueError(f"sample indices must lie in [0, {MAX_SAMPLES}), got [{first}, {stop})")

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


# ============================================================================ DDIM and samplers
SAMPLERS = ("ddpm", "ddim")
SAMPLE_BACKENDS = ("fast", "reference")


def ddim_timesteps(T: int, steps: int) -> list:
    """``steps`` timesteps evenly spaced over [0, T-1], both ends included, in sampling (descending)
    order: round(i (T-1) / (steps-1)); one step is [T-1]. ``steps == T`` gives every timestep."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T] = [1, {T}], got {steps}")
    if steps == 1:
        return [T - 1]
    ts = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
    return ts[::-1]


def timestep_pairs(sampler: str, T: int, steps: Optional[int] = None):
    """(t, t_prev) lists of a run: DDPM all T steps (t_prev = t - 1), DDIM the sub-sequence (t_prev = -1
    after the last)."""
    if sampler == "ddpm":
        if steps is not None and steps != T:
            raise ValueError(f"the ddpm sampler runs all T = {T} steps; steps={steps} needs sampler 'ddim'")
        ts = list(range(T - 1, -1, -1))
    elif sampler == "ddim":
        ts = ddim_timesteps(T, T if steps is None else steps)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return ts, ts[1:] + [-1]


@torch.no_grad()
def reference_ddim_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                          omega: float = 0.0, method: str = "cfg", steps: Optional[int] = None, eta: float = 0.0,
                          clip_x0: bool = False, generator: Optional[torch.Generator] = None,
                          noise_fn: Optional[Callable[[int], torch.Tensor]] = None,
                          progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """DDIM in the reference style: fp32, the authors' two forwards per step, a Python loop and the
    pure-torch step ``ops.ddim_step_reference``. noise_fn(t) (else ``generator``) gives the noise
    leaving timestep t (only read when eta > 0)."""
    from . import ops

    _check_sampling_args(model, x_T, y, method)
    ts, prevs = timestep_pairs("ddim", schedule.T, steps)
    ab = schedule.alphas_bar.float().to(x_T.device).contiguous()
    x_t = x_T.float().clone()
    B = x_t.shape[0]
    for step, prev in zip(ts, prevs):
        t = torch.full((B,), step, dtype=torch.long, device=x_t.device)
        t_prev = torch.full((B,), prev, dtype=torch.long, device=x_t.device)
        eps_c, eps_u = guided_eps(model, x_t, t, y, omega, method)
        noise = None
        if eta > 0:  # (the final step, t_prev = -1, has sigma = 0 and ignores it)
            noise = noise_fn(step) if noise_fn is not None else torch.randn(x_t.shape, generator=generator,
                                                                             device=x_t.device)
        x_t = ops.ddim_step_reference(x_t, eps_c.float(), None if eps_u is None else eps_u.float(), t, t_prev,
                                      noise, ab, eta=eta, omega=omega, clip_x0=clip_x0)
        if progress is not None:
            progress(step)
    return x_t.clamp(-1.0, 1.0)


def _check_run_args(sampler, steps, eta, omega, method, var_type, T):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta applies to the ddim sampler only (ddpm's noise is set by var_type)")
    if not (math.isfinite(omega) and omega >= 0):
        raise ValueError(f"omega must be finite and >= 0, got {omega}")
    if var_type not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"var_type must be fixedlarge or fixedsmall, got {var_type!r}")
    timestep_pairs(sampler, T, steps)  # raises for a bad steps
    if T + 1 > MAX_DRAWS:
        raise ValueError(f"per-sample noise supports T < {MAX_DRAWS - 1}, got T = {T}")


class ReferenceSampler:
    """The baseline: ``reference_sample`` (DDPM, the authors' loop) or ``reference_ddim_sample``, fp32, two
    forwards per step, with the per-sample ``CounterNoise`` of (seed, global sample index).

    ``sampler(y, index)`` -> x_0 in [-1, 1] (float32) for labels y (B,) (None for uncond) and global
    sample indices ``index`` (B,)."""

    backend = "reference"

    def __init__(self, model, schedule: Schedule, shape, seed: int = 0, sampler: str = "ddpm",
                 steps: Optional[int] = None, eta: float = 0.0, omega: float = 0.0, method: str = "cfg",
                 var_type: str = "fixedlarge", clip_x0: bool = False):
        _check_run_args(sampler, steps, eta, omega, method, var_type, schedule.T)
        self.model, self.schedule = model, schedule
        self.device = next(model.parameters()).device
        self.noise = CounterNoise(seed, shape, self.device)
        self.kw = dict(omega=omega, method=method, clip_x0=clip_x0)
        self.sampler, self.steps, self.eta, self.var_type = sampler, steps, eta, var_type
        self.timesteps = timestep_pairs(sampler, schedule.T, steps)[0]

    @torch.no_grad()
    def __call__(self, y: Optional[torch.Tensor], index: torch.Tensor,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        index = index.to(self.device, torch.int64)
        y = None if y is None else y.to(self.device, torch.int64)
        x_T = self.noise(index, 0)
        noise_fn = lambda t: self.noise(index, t + 1)  # noqa: E731
        if self.sampler == "ddpm":
            return reference_sample(self.model, self.schedule, x_T, y, var_type=self.var_type, noise_fn=noise_fn,
                                    progress=progress, **self.kw)
        return reference_ddim_sample(self.model, self.schedule, x_T, y, steps=self.steps, eta=self.eta,
                                     noise_fn=noise_fn, progress=progress, **self.kw)


class _BatchState:
    """Static buffers of one batch size (a CUDA graph reads and writes them by address)."""

    def __init__(self, B, shape, device, guided_batched, cond, augm):
        self.B = B
        self.x = torch.zeros((B,) + tuple(shape), device=device)
        self.index = torch.zeros(B, dtype=torch.int64, device=device)
        self.y = torch.zeros(B, dtype=torch.int64, device=device)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)  # position in the timestep sequence
        n = 2 * B if guided_batched else B
        self.mask = torch.cat([torch.ones(B, device=device), torch.zeros(B, device=device)]) if guided_batched else None
        self.augm = torch.zeros(n, 9, device=device) if augm else None
        self.graph = None
        self.host_k = 0  # run_step's host copy of k (no sync to read it)


class FastSampler:
    """Our sampler: one forward of 2B per guided step (conditional half, and the unconditional half
    through the label mask y_mask = 0), the step in the C++/CUDA extension (``ops.ddpm_step`` /
    ``ops.ddim_step``), bf16 autocast (default on CUDA), and on CUDA the per-step work -- forward,
    per-sample noise, step, timestep advance -- captured once per batch size as a CUDA graph and
    replayed T (or --steps) times. The timestep is not a Python value: a device counter k indexes a
    device table of the timesteps, and the graph increments it, so a replay needs no host work.
    Noise: ``CounterNoise`` of (seed, global sample index), identical to ``ReferenceSampler``'s, so
    the two agree to rounding (exactly the same algorithm in fp32 on CPU).

    channels_last=True and patch=True change ``model`` in place (memory format; fused modules of
    cbdm_fast.nn swapped in by ``patch_model``). A batch smaller than an already captured one is
    padded (with copies of its first sample; the samples are independent, so padding does not
    change the others) and replays that graph.
    """

    backend = "fast"

    def __init__(self, model, schedule: Schedule, shape, seed: int = 0, sampler: str = "ddpm",
                 steps: Optional[int] = None, eta: float = 0.0, omega: float = 0.0, method: str = "cfg",
                 var_type: str = "fixedlarge", clip_x0: bool = False, amp: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, channels_last: bool = False, step_backend: str = "auto",
                 patch: bool = False, compile: bool = False):
        _check_run_args(sampler, steps, eta, omega, method, var_type, schedule.T)
        if method != "uncond" and getattr(model, "label_embedding", 1) is None:
            raise ValueError(f"method {method!r} needs a conditional model (this one has cond=False)")
        self.model, self.schedule = model, schedule
        self.device = device = next(model.parameters()).device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
        self.amp = (device.type == "cuda") if amp is None else bool(amp)
        self.cuda_graph = (device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        self.channels_last, self.patch = bool(channels_last), bool(patch)
        if self.patch:  # the fused modules of cbdm_fast.nn (GroupNorm+SiLU, attention), in place
            from .nn import patch_model
            patch_model(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # compile: the UNet forward under torch.compile (inductor's fused kernels); it compiles during
        # the warm-up steps that precede the CUDA graph capture, and the graph replays its kernels
        self.net = torch.compile(model, dynamic=False) if compile else model
        self.shape = tuple(shape)
        self.noise = CounterNoise(seed, shape, device)
        self.sampler, self.eta, self.omega = sampler, float(eta), float(omega)
        self.method, self.clip_x0 = method, bool(clip_x0)
        self.step_backend = step_backend
        self.guided = method == "cfg" and omega > 0
        self.batched = self.guided and _supports_label_mask(model)
        self.augm = getattr(model, "augm_embedding", None) is not None
        self.timesteps, prevs = timestep_pairs(sampler, schedule.T, steps)
        self._ts = torch.tensor(self.timesteps, dtype=torch.int64, device=device)
        self._prevs = torch.tensor(prevs, dtype=torch.int64, device=device)
        self._table = schedule.sampling_table(var_type).to(device)
        self._ab = schedule.alphas_bar.float().to(device).contiguous()
        self._states = {}

    # ------------------------------------------------------------------ one step (eager or captured)
    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graph)

    def _model_input(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _eps(self, st, x, t):
        B = st.B
        y = st.y if self.method != "uncond" else None
        with self._autocast():
            if self.batched:
                out = self.net(self._model_input(torch.cat([x, x])), torch.cat([t, t]), y=torch.cat([y, y]),
                                augm=st.augm, y_mask=st.mask)
                eps_c, eps_u = out[:B], out[B:]
            elif self.guided:  # a model without y_mask: the authors' two forwards
                eps_c, eps_u = guided_eps(self.net, self._model_input(x), t, y, self.omega, self.method)
            else:
                eps_c, eps_u = self.net(self._model_input(x), t, y=y, augm=st.augm), None
        eps_c = eps_c.float().contiguous()
        return eps_c, None if eps_u is None else eps_u.float().contiguous()

    def _step(self, st):
        from . import ops

        t = self._ts.index_select(0, st.k).expand(st.B).contiguous()
        x = st.x
        eps_c, eps_u = self._eps(st, x, t)
        draw = t[:1] + 1
        if self.sampler == "ddpm":
            noise = self.noise(st.index, draw)
            new = ops.ddpm_step(x, eps_c, eps_u, t, noise, self._table, omega=self.omega, clip_x0=self.clip_x0,
                                backend=self.step_backend)
        else:
            t_prev = self._prevs.index_select(0, st.k).expand(st.B).contiguous()
            noise = self.noise(st.index, draw) if self.eta > 0 else None
            new = ops.ddim_step(x, eps_c, eps_u, t, t_prev, noise, self._ab, eta=self.eta, omega=self.omega,
                                clip_x0=self.clip_x0, backend=self.step_backend)
        x.copy_(new)
        st.k.add_(1)

    def _capture(self, st):
        with torch.cuda.device(self.device):
            self._capture_on_device(st)

    def _capture_on_device(self, st):
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN algorithm choice, allocator, lazy init
                self._step(st)
                st.k.zero_()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(st)
        st.k.zero_()
        st.graph = graph

    @torch.no_grad()
    def _state(self, b):
        if self.cuda_graph:
            bigger = [B for B in self._states if B >= b]
            if bigger:
                return self._states[min(bigger)]
        if b not in self._states:
            st = _BatchState(b, self.shape, self.device, self.batched, self.method != "uncond", self.augm)
            if self.cuda_graph:
                self._capture(st)
            self._states[b] = st
        return self._states[b]

    def prepare(self, batch_size: int) -> None:
        """Allocate (and on CUDA capture) the batch size ahead of time (the benchmark's warm-up)."""
        self._state(batch_size)

    @torch.no_grad()
    def run_step(self, batch_size: int) -> None:
        """One step on the batch buffers of ``batch_size`` (graph replay or eager; the benchmark's unit).
        The timestep counter wraps around at the end of the sequence."""
        st = self._state(batch_size)
        if st.host_k >= len(self.timesteps):
            st.k.zero_()
            st.host_k = 0
        st.host_k += 1
        if st.graph is not None:
            st.graph.replay()
        else:
            self._step(st)

    @torch.no_grad()
    def __call__(self, y: Optional[torch.Tensor], index: torch.Tensor,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        b = index.shape[0]
        if self.method != "uncond" and (y is None or y.shape != (b,)):
            raise ValueError(f"method {self.method!r} needs labels y of shape ({b},)")
        if b == 0:
            return torch.empty((0,) + self.shape, device=self.device)
        with torch.no_grad():
            st = self._state(b)
            pad = st.B - b
            index = index.to(self.device, torch.int64)
            st.index.copy_(torch.cat([index, index[:1].expand(pad)]) if pad else index)
            if y is not None:
                y = y.to(self.device, torch.int64)
                st.y.copy_(torch.cat([y, y[:1].expand(pad)]) if pad else y)
            st.x.copy_(self.noise(st.index, 0))
            st.k.zero_()
            st.host_k = len(self.timesteps)
            for t in self.timesteps:
                if st.graph is not None:
                    st.graph.replay()
                else:
                    self._step(st)
                if progress is not None:
                    progress(t)
            return st.x[:b].clamp(-1.0, 1.0)


FAST_ONLY = ("amp", "cuda_graph", "channels_last", "step_backend", "patch", "compile")


def make_sampler(backend: str, model, schedule: Schedule, shape, **kwargs):
    """``FastSampler`` (backend 'fast') or ``ReferenceSampler`` ('reference'); the fast-only keywords
    (amp, cuda_graph, channels_last, step_backend, patch) are rejected for the reference backend."""
    if backend == "fast":
        return FastSampler(model, schedule, shape, **kwargs)
    if backend == "reference":
        fast_only = set(FAST_ONLY) & {k for k, v in kwargs.items() if v is not None and v is not False}
        if fast_only:
            raise ValueError(f"the reference sampler takes no {sorted(fast_only)} (fp32, two forwards, Python loop)")
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in FAST_ONLY}
        return ReferenceSampler(model, schedule, shape, **kwargs)
    raise ValueError(f"backend must be one of {SAMPLE_BACKENDS}, got {backend!r}")
