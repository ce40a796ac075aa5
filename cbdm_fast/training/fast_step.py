"""The fast training step as one object: device draws + ``fused_step``, optionally compiled, and on a
GPU the whole step (draws, forward, loss, backward, clipping, Adam, EMA) replayed as ONE CUDA graph.

Backends (``FastStep(backend=...)``):
- ``fused``: ``draw_device`` + ``fused_step`` run eagerly (one 2B forward, foreach/fused clip, Adam
  and EMA, no host sync).
- ``compiled``: the same with the model under ``torch.compile`` (inductor: fused elementwise and
  normalisation kernels; on CPU, C++/OpenMP kernels). On CUDA, after ``warmup`` ordinary steps (they
  compile the model and create Adam's state; they are real training steps, not thrown away), the
  next step is captured as a CUDA graph and every later step is a copy of the batch into static
  buffers plus ``graph.replay()``. The random draws use the default device generator, which CUDA
  graphs advance on every replay, so a replayed step draws fresh t, noise, label drop and y_bal.

Non-finite losses are detected without a host sync: ``first_bad`` (a device int64, -1 while all
losses were finite) records the first step whose loss was NaN or infinite; ``check_finite()`` reads
it (one sync) and the caller calls it at its log and checkpoint points.

Shapes are static (batch size, image size); a CUDA graph and an inductor graph are built once.
"""
from __future__ import annotations

from typing import Optional

import torch

from .steps import Draws, StepConfig, draw_device, ema_pairs, fused_step

BACKENDS = ("fused", "compiled")


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite; ``step`` is its 1-based index within this FastStep's steps."""

    def __init__(self, step: int):
        super().__init__(f"loss is not finite at step {step}")
        self.step = step


class FastStep:
    """Runs fast CBDM training steps on (x_0, y) batches; see the module docstring.

    model: the training model (already on its device, channels_last if cfg.channels_last); ema: its
    EMA copy; optimizer: from ``make_optimizer`` (capturable=True for CUDA graphs); scheduler: an LR
    scheduler stepped once per step, outside the graph; class_cdf: ``steps.class_cdf`` of the y_bal
    distribution (cbdm) or None; drop_p, per_sample: the label drop; side_stream: the CUDA stream for the
    warm-up steps and the capture (default: a fresh one each warm-up step, torch.cuda.graph's for the capture).
    """

    def __init__(self, model, ema, optimizer, scheduler, schedule, cfg: StepConfig, class_cdf: Optional[torch.Tensor],
                 drop_p: float, per_sample: bool = False, backend: str = "compiled", cuda_graph: Optional[bool] = None,
                 warmup: int = 3, compile_options: Optional[dict] = None, side_stream=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        device = next(model.parameters()).device
        self.device, self.backend, self.cfg = device, backend, cfg
        self.model, self.ema, self.optimizer, self.scheduler, self.schedule = model, ema, optimizer, scheduler, schedule
        self.class_cdf, self.drop_p, self.per_sample = class_cdf, float(drop_p), bool(per_sample)
        self.cb = cfg.method == "cbdm"
        if self.cb and class_cdf is None:
            raise ValueError("method cbdm needs class_cdf (the y_bal distribution)")
        if cuda_graph is None:
            cuda_graph = backend == "compiled" and device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs a model on a CUDA device")
        if cuda_graph and not _is_capturable(optimizer):
            raise ValueError("cuda_graph=True needs a capturable optimizer (steps.make_optimizer(..., capturable=True))")
        self.cuda_graph, self.warmup = bool(cuda_graph), max(1, int(warmup))
        # warm-up steps and the capture on this stream when given (DDP needs the stream it was built on),
        # else warm-up on a fresh side stream and capture on torch.cuda.graph's own
        self._side_stream = side_stream
        self.forward_model = (torch.compile(model, dynamic=False, **(compile_options or {}))
                              if backend == "compiled" else model)
        self.pairs = ema_pairs(model, ema)
        self.steps_done = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._graph = None
        self._static = None   # (x_0, y) buffers the graph reads
        self._out = None      # the graph's loss tensors

    # ------------------------------------------------------------------------------ one step
    def _body(self, x_0: torch.Tensor, y: Optional[torch.Tensor], augm: Optional[torch.Tensor] = None) -> dict:
        """Draws + fused step + the finite-loss bookkeeping: everything that the graph records."""
        d: Draws = draw_device(x_0.shape[0], x_0, self.class_cdf, self.schedule.T, self.drop_p, self.cb,
                               per_sample=self.per_sample)
        out = fused_step(self.forward_model, self.ema, self.optimizer, _NoScheduler, self.schedule, x_0, y, d,
                         self.cfg, ema_tensors=self.pairs, augm=augm)
        self._count.add_(1)
        bad = ~torch.isfinite(out["loss"]) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self._count, self.first_bad))
        return out

    def __call__(self, x_0: torch.Tensor, y: Optional[torch.Tensor], augm: Optional[torch.Tensor] = None) -> dict:
        """One training step; returns device loss tensors {"loss", "loss_ddpm", "loss_reg"} (no sync).
        augm: the batch's (B, 9) ADA conditioning (cbdm_fast.data.ada), or None.

        With CUDA graphs the returned tensors are the graph's outputs, overwritten by the next step:
        read (or clone) them before calling again.
        """
        if self.cuda_graph and self.steps_done >= self.warmup:
            out = self._replay(x_0, y, augm)
        elif self.cuda_graph:
            out = self._on_side_stream(x_0, y, augm)
        else:
            out = self._body(x_0, y, augm)
        self.scheduler.step()
        self.steps_done += 1
        return out

    def check_finite(self) -> None:
        """Raise NonFiniteLoss naming the first non-finite step so far (one host sync)."""
        first = int(self.first_bad.item())
        if first >= 0:
            raise NonFiniteLoss(first)

    # ----------------------------------------------------------------------------- CUDA graph
    def _on_side_stream(self, x_0, y, augm=None) -> dict:
        # warm-up steps run on a side stream, as CUDA graph capture requires of the work before it
        side = self._side_stream if self._side_stream is not None else torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self._body(x_0, y, augm)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _replay(self, x_0, y, augm=None) -> dict:
        if self._graph is None:
            self._capture(x_0, y, augm)
        sx, sy, sa = self._static
        if (x_0.shape != sx.shape or (y is None) != (sy is None) or (y is not None and y.shape != sy.shape)
                or (augm is None) != (sa is None)):
            raise ValueError(f"the CUDA graph was captured for x_0 {tuple(sx.shape)}, labels "
                             f"{'yes' if sy is not None else 'no'}, augm {'yes' if sa is not None else 'no'}; got "
                             f"{tuple(x_0.shape)} (shapes are static: keep the batch size and inputs fixed)")
        sx.copy_(x_0)
        for static, value in ((sy, y), (sa, augm)):
            if static is not None:
                static.copy_(value)
        self._graph.replay()
        return self._out

    def _graph_generators(self) -> list:
        """CUDA generators other than the default one that the step draws from (none here)."""
        return []

    def _capture(self, x_0, y, augm=None) -> None:
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        sx = torch.empty_like(x_0, memory_format=fmt).copy_(x_0)
        sy = None if y is None else y.clone()
        sa = None if augm is None else augm.clone()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        for generator in self._graph_generators():
            graph.register_generator_state(generator)  # replays advance it, as they do the default one
        with torch.cuda.graph(graph, stream=self._side_stream):
            out = self._body(sx, sy, sa)
        # capture records without running: the caller's replay performs this step
        self._graph, self._static, self._out = graph, (sx, sy, sa), out


class _NoSchedulerType:
    """fused_step steps its scheduler; FastStep steps the real one outside the graph instead."""

    @staticmethod
    def step():
        pass


_NoScheduler = _NoSchedulerType()


def _is_capturable(optimizer) -> bool:
    return all(g.get("capturable", False) for g in optimizer.param_groups)
