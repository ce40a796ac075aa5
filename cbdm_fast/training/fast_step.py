"""The fast training step as one object, for one process and for data parallelism: injected draws +
``step.fused_step``, optionally compiled, and on a GPU the whole step (draws, forward, loss, backward,
clipping, Adam, EMA) replayed as ONE CUDA graph.

Backends (``FastStep(backend=...)``, config.FAST_BACKENDS):
- ``fused``: the draws + ``fused_step`` run eagerly (one 2B forward, foreach/fused clip, Adam and EMA,
  no host sync).
- ``compiled``: the same with ``step.BatchedLoss`` (q_sample, the 2B forward, the loss terms) under
  ``torch.compile``, fullgraph: inductor fuses the elementwise work around our kernels' custom ops
  (cfg.kernels "fused") or generates its own normalisation and loss kernels ("inductor"); on CPU,
  C++/OpenMP kernels. On CUDA, after ``warmup`` ordinary steps (they
  compile the BatchedLoss and create Adam's state; they are real training steps, not thrown away), the
  next step is captured as a CUDA graph and every later step is a copy of the batch into static
  buffers plus ``graph.replay()``. The draws' generators advance on every replay (the default one
  always; others when passed as ``generators``), so a replayed step draws fresh t, noise, label drop
  and y_bal.

What data parallelism changes is injected (training/ddp.py builds it): ``draw`` draws the global batch
and keeps this rank's slice, ``loss`` is the DDP-wrapped BatchedLoss (its backward all-reduces the
gradients), ``reduce`` turns the losses into their means over ranks. The caller steps the LR scheduler.

Non-finite losses are detected without a host sync: ``first_bad`` (a device int64, -1 while all
losses were finite) records the first step whose loss was NaN or infinite; ``check_finite()`` reads
it (one sync) and the caller calls it at its log and checkpoint points.

Shapes are static (batch size, image size); a CUDA graph and an inductor graph are built once.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import FAST_BACKENDS
from .draws import Draws
from .step import LOSS_NAMES, BatchedLoss, StepConfig, TrainingDiverged, ema_pairs, fused_step


class FastStep:
    """Runs fast CBDM training steps on (x_0, y) batches; see the module docstring.

    model: the training model (already on its device, channels_last if cfg.channels_last); ema: its EMA
    copy; optimizer: from ``step.make_optimizer`` (capturable=True for CUDA graphs); draw: x_0 -> Draws on
    the device with no host sync (``draws.draw_device`` bound to its arguments; ``ddp.rank_draws`` under
    DDP); loss: the step's BatchedLoss over ``model`` wrapped in DDP (``ddp.wrap_step``), or None for
    ``BatchedLoss(model, schedule, cfg)`` (with cfg.kernels "fused" that patches ``model`` in place);
    reduce: the stacked (loss, loss_ddpm, loss_reg) to their logged values (DDP: the mean over ranks) or
    None; side_stream: the CUDA stream for the warm-up steps and the capture (default: a fresh one each
    warm-up step, torch.cuda.graph's for the capture; a DDP loss must be built on it); generators: CUDA
    generators other than the default one that ``draw`` uses; first_step: the steps done before this
    object's first (TrainingDiverged names the run's step).
    """

    def __init__(self, model, ema, optimizer, schedule, cfg: StepConfig, draw: Callable[[torch.Tensor], Draws], *,
                 loss: Optional[torch.nn.Module] = None,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 backend: str = "compiled", cuda_graph: Optional[bool] = None, warmup: int = 3,
                 compile_options: Optional[dict] = None, side_stream=None, generators=(), first_step: int = 0):
        if backend not in FAST_BACKENDS:
            raise ValueError(f"backend must be one of {FAST_BACKENDS}, got {backend!r}")
        device = next(model.parameters()).device
        if cuda_graph is None:
            cuda_graph = backend == "compiled" and device.type == "cuda"
        if cuda_graph and loss is not None and side_stream is None:
            raise ValueError("cuda_graph=True with a loss wrapper (DDP) needs side_stream: the stream the "
                             "wrapper was built on (ddp.wrap_step(..., stream=side_stream))")
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs a model on a CUDA device")
        if cuda_graph and not _is_capturable(optimizer):
            raise ValueError("cuda_graph=True needs a capturable optimizer (step.make_optimizer(..., capturable=True))")
        self.device, self.backend, self.cfg = device, backend, cfg
        self.model, self.ema, self.optimizer, self.schedule = model, ema, optimizer, schedule
        self.draw, self.reduce, self.generators = draw, reduce, list(generators)
        self.cuda_graph, self.warmup = bool(cuda_graph), max(1, int(warmup))
        self._side_stream = side_stream
        whole = loss is None  # one graph, no break; DDP's compiled module is split at its buckets by design
        loss = BatchedLoss(model, schedule, cfg) if whole else loss
        self.loss = (torch.compile(loss, dynamic=False, fullgraph=whole, **(compile_options or {}))
                     if backend == "compiled" else loss)
        self.pairs = ema_pairs(model, ema)
        self.steps_done, self.first_step = 0, int(first_step)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._graph = None
        self._static = None   # (x_0, y, augm) buffers the graph reads
        self._out = None      # the graph's loss tensors

    # ------------------------------------------------------------------------------ one step
    def _body(self, x_0: torch.Tensor, y: Optional[torch.Tensor], augm: Optional[torch.Tensor] = None) -> dict:
        """Draws + fused step + loss reduction + the finite-loss bookkeeping: everything the graph records."""
        out = fused_step(self.model, self.ema, self.optimizer, self.schedule, x_0, y, self.draw(x_0), self.cfg,
                         augm=augm, loss=self.loss, ema_tensors=self.pairs)
        if self.reduce is not None:
            out = dict(zip(LOSS_NAMES, self.reduce(torch.stack([out[k] for k in LOSS_NAMES])).unbind()))
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
        self.steps_done += 1
        return out

    def check_finite(self) -> None:
        """Raise TrainingDiverged naming the first non-finite step so far (one host sync)."""
        first = int(self.first_bad.item())
        if first >= 0:
            step = self.first_step + first
            raise TrainingDiverged(f"loss is not finite at step {step}", step)

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

    def _capture(self, x_0, y, augm=None) -> None:
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        sx = torch.empty_like(x_0, memory_format=fmt).copy_(x_0)
        sy = None if y is None else y.clone()
        sa = None if augm is None else augm.clone()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)  # replays advance it, as they do the default one
        with torch.cuda.graph(graph, stream=self._side_stream):
            out = self._body(sx, sy, sa)
        # capture records without running: the caller's replay performs this step
        self._graph, self._static, self._out = graph, (sx, sy, sa), out


def _is_capturable(optimizer) -> bool:
    return all(g.get("capturable", False) for g in optimizer.param_groups)
