"""``FastSampler``: the reference samplers' algorithms (ddpm_sample, ddim_sample, dpm_solver_sample) made
fast, and tested against ``ReferenceSampler`` image for image.

One forward of 2B per guided step (the unconditional half through the label mask y_mask = 0), the
step in the C++/CUDA extension (``ops.ddpm_step`` / ``ops.ddim_step`` / ``ops.dpm_step``), bf16 autocast
(default on CUDA), and on CUDA the per-step work -- forward, per-sample noise, step, timestep advance --
captured once per batch size as a CUDA graph and replayed T (or ``steps``) times. The timestep is not a
Python value: a device counter k indexes a device table of the timesteps (and DPM-Solver++'s table of
per-step coefficients) and the graph increments it, so a replay needs no host work; DPM-Solver++'s
history (the previous step's x0) lives in a device buffer of the batch. Noise: ``CounterNoise`` of
(seed, global sample index), identical to ``ReferenceSampler``'s, so the two agree to rounding (exactly
the same algorithm in fp32 on CPU).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .. import ops
from ..schedule import Schedule
from .guidance import check_conditional, guided_eps, is_guided, takes_label_mask
from .noise import CounterNoise, check_indices
from .dpm_solver import dpm_solver_coefficients
from .options import check_sampler_options, timestep_pairs


class _BatchState:
    """Static buffers of one batch size (a CUDA graph reads and writes them by address)."""

    def __init__(self, B, shape, device, guided_batched, augm, history):
        self.B = B
        self.x = torch.zeros((B,) + tuple(shape), device=device)
        self.x0_prev = torch.zeros_like(self.x) if history else None  # DPM-Solver++: the previous step's x0
        self.index = torch.zeros(B, dtype=torch.int64, device=device)
        self.y = torch.zeros(B, dtype=torch.int64, device=device)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)  # position in the timestep sequence
        n = 2 * B if guided_batched else B
        self.mask = torch.cat([torch.ones(B, device=device), torch.zeros(B, device=device)]) if guided_batched else None
        self.augm = torch.zeros(n, 9, device=device) if augm else None
        self.graph = None
        self.host_k = 0  # the host's copy of k (read without a device sync)


class FastSampler:
    """``sampler(y, index)`` -> x_0 in [-1, 1] (float32) for labels y (B,) (None for uncond) and
    global sample indices ``index`` (B,); the options are ``ReferenceSampler``'s plus the speed ones.

    channels_last=True and patch=True change ``model`` in place (memory format; fused modules of
    cbdm_fast.nn swapped in by ``patch_model``). compile=True runs the UNet under torch.compile; it
    compiles during the warm-up steps before the capture, and the graph replays its kernels. A batch
    smaller than an already captured one is padded (with copies of its first sample; the samples are
    independent, so padding does not change the others) and replays that graph.
    """

    def __init__(self, model, schedule: Schedule, shape, seed: int = 0, sampler: str = "ddpm",
                 steps: Optional[int] = None, eta: float = 0.0, omega: float = 0.0, method: str = "cfg",
                 var_type: str = "fixedlarge", clip_x0: bool = False, spacing: Optional[str] = None,
                 amp: Optional[bool] = None, cuda_graph: Optional[bool] = None, channels_last: bool = False,
                 step_backend: str = "auto", patch: bool = False, compile: bool = False):
        check_sampler_options(sampler, steps, eta, omega, method, var_type, schedule, spacing)
        check_conditional(model, method)
        self.model, self.schedule = model, schedule
        self.device = device = next(model.parameters()).device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
        self.amp = (device.type == "cuda") if amp is None else bool(amp)
        self.cuda_graph = (device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        self.channels_last, self.patch = bool(channels_last), bool(patch)
        if self.patch:
            from ..nn import patch_model  # only when asked: it brings in the Triton kernels

            patch_model(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.net = torch.compile(model, dynamic=False) if compile else model
        self.shape = tuple(shape)
        self.noise = CounterNoise(seed, shape, device)
        self.sampler, self.eta, self.omega = sampler, float(eta), float(omega)
        self.method, self.clip_x0 = method, bool(clip_x0)
        self.step_backend = step_backend
        self.guided = is_guided(method, omega)
        self.batched = self.guided and takes_label_mask(model)
        self.augm = getattr(model, "augm_embedding", None) is not None
        self.timesteps, prevs = timestep_pairs(sampler, schedule, steps, spacing)
        self._ts = torch.tensor(self.timesteps, dtype=torch.int64, device=device)
        self._prevs = torch.tensor(prevs, dtype=torch.int64, device=device)
        self._table = schedule.sampling_table(var_type).to(device)
        self._ab = schedule.alphas_bar.float().to(device).contiguous()
        if sampler == "dpm++2m":  # one row of coefficients per step, indexed by k like the timesteps
            self._coefs = dpm_solver_coefficients(schedule, self.timesteps + prevs[-1:],
                                                  self.omega if self.guided else 0.0).float().to(device)
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
        """The step at position k of the timesteps (the reference samplers' loop body), then k += 1."""
        t = self._ts.index_select(0, st.k).expand(st.B).contiguous()
        x = st.x
        eps_c, eps_u = self._eps(st, x, t)
        draw = t[:1] + 1  # the noise leaving timestep t (a device tensor: no host sync; unused by dpm++2m)
        if self.sampler == "dpm++2m":  # deterministic; writes x and the history x0_prev in place (row k)
            ops.dpm_step(x, eps_c, eps_u, st.x0_prev, self._coefs, st.k, clip_x0=self.clip_x0,
                         backend=self.step_backend)
        elif self.sampler == "ddpm":
            noise = self.noise(st.index, draw)
            x.copy_(ops.ddpm_step(x, eps_c, eps_u, t, noise, self._table, omega=self.omega, clip_x0=self.clip_x0,
                                  backend=self.step_backend))
        else:
            t_prev = self._prevs.index_select(0, st.k).expand(st.B).contiguous()
            noise = self.noise(st.index, draw) if self.eta > 0 else None
            x.copy_(ops.ddim_step(x, eps_c, eps_u, t, t_prev, noise, self._ab, eta=self.eta, omega=self.omega,
                                  clip_x0=self.clip_x0, backend=self.step_backend))
        st.k.add_(1)

    def _capture(self, st):
        with torch.cuda.device(self.device):
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
            st = _BatchState(b, self.shape, self.device, self.batched, self.augm, self.sampler == "dpm++2m")
            if self.cuda_graph:
                self._capture(st)
            self._states[b] = st
        return self._states[b]

    # ------------------------------------------------------------------ a batch
    def _check_labels(self, y: Optional[torch.Tensor], b: int) -> None:
        if self.method != "uncond" and (y is None or y.shape != (b,)):
            raise ValueError(f"method {self.method!r} needs labels y of shape ({b},)")

    @torch.no_grad()
    def start(self, y: Optional[torch.Tensor], index: torch.Tensor) -> int:
        """Load a batch into the buffers of its size (captured on first use on CUDA): labels, global
        indices, x_T (noise draw 0), the timestep counter at the first step. Returns the buffers'
        batch size: ``index``'s, or the larger captured size it is padded to."""
        b = index.shape[0]
        self._check_labels(y, b)
        check_indices(index)
        st = self._state(b)
        pad = st.B - b
        index = index.to(self.device, torch.int64)
        st.index.copy_(torch.cat([index, index[:1].expand(pad)]) if pad else index)
        if y is not None:
            y = y.to(self.device, torch.int64)
            st.y.copy_(torch.cat([y, y[:1].expand(pad)]) if pad else y)
        st.x.copy_(self.noise(st.index, 0))
        st.k.zero_()
        st.host_k = 0
        return st.B

    def _advance(self, st: _BatchState) -> None:
        """One step (graph replay or eager); the counter wraps around at the end of the sequence."""
        if st.host_k >= len(self.timesteps):
            st.k.zero_()
            st.host_k = 0
        st.host_k += 1
        if st.graph is not None:
            st.graph.replay()
        else:
            self._step(st)

    @torch.no_grad()
    def run_step(self, batch_size: int) -> None:
        """One step of the batch ``start`` loaded into the buffers of ``batch_size`` (the benchmark's unit)."""
        self._advance(self._state(batch_size))

    @torch.no_grad()
    def __call__(self, y: Optional[torch.Tensor], index: torch.Tensor,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        b = index.shape[0]
        self._check_labels(y, b)
        if b == 0:
            return torch.empty((0,) + self.shape, device=self.device)
        st = self._state(self.start(y, index))
        for t in self.timesteps:
            self._advance(st)
            if progress is not None:
                progress(t)
        return st.x[:b].clamp(-1.0, 1.0)
