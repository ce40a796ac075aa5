"""Data-parallel training under torchrun: the same algorithm as one process, the global batch split.

    torchrun --standalone --nproc_per_node N -m cbdm_fast.train --batch-size 48 ...

``--batch-size`` is the GLOBAL batch; each of the N ranks trains on batch_size / N images of it
(an error names both numbers when N does not divide it). What each rank does, and why:

- Process group: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. ``setup`` initialises NCCL with the
  device cuda:LOCAL_RANK on a GPU, gloo on the CPU, plus a small gloo group for host-side flags
  (the stop request), so checking it never waits on the GPU. WORLD_SIZE 1 (or no torchrun) is the
  plain single-process path, untouched.
- Data: every rank draws the same epoch permutation (and flips) from the shared seed and takes its
  own contiguous slice of each global batch (``BatchStream(rank=, world_size=)``): the union over
  ranks is the single-process batch, and resume is exact.
- Random draws: t, noise, the label drop and y_bal are drawn for the WHOLE global batch on every
  rank, from a "draw" generator that starts in the state the single process's default generator
  has after model initialisation, and each rank keeps its slice. So the label drop is one draw per
  global batch on which all ranks agree (as in the authors' algorithm), and a run on N ranks draws
  exactly the randomness of the single process (tests/test_distributed.py compares them). The
  default generators, which now drive only dropout, are re-seeded per rank (``rank_seed``) so
  dropout masks are independent across ranks. With dropout > 0 the N-rank run is the same
  algorithm with different dropout masks; with dropout 0 it matches the single process up to fp32
  reduction order.
- Gradients: each rank's loss is the mean over its slice; DDP averages the gradients, which is the
  gradient of the global-batch mean (equal slices). Clipping, Adam and EMA then see identical
  gradients on every rank, so parameters and EMA stay identical without further communication.
  The logged losses are all-reduced means (one 3-element collective per step, on the device).
- The label embedding on a whole-batch label drop: the fused/compiled step keeps it in the graph
  (its output times keep = 0, an exact-zero gradient; ``steps._AdamSkip`` undoes Adam's move), so
  DDP runs with find_unused_parameters=False. The eager step (the authors' two forwards) does not
  use it at all then, so its DDP uses find_unused_parameters=True (DDP marks the unused parameter
  ready instead of waiting for it forever), and the step sets its gradient to None afterwards so
  Adam skips it, exactly as the single process does. Both forwards run inside one DDP forward
  (``EagerPair``) because DDP expects one forward per backward.
- Compiled backend: torch.compile of the DDP module; the one-CUDA-graph-per-step capture is off
  under DDP (whole-step capture of NCCL collectives is not supported here yet).
- Checkpoints: written by rank 0 only, atomically, followed by a barrier. They hold the draw
  generators' states under rng["cpu"]/rng["cuda"] (the same keys as a single-process checkpoint,
  whose default generator plays that role) and every rank's own (dropout) generator states,
  gathered with all_gather_object, under rng["ranks"]. Resuming on the same number of ranks is
  exact; on another number of ranks (or in one process) the data and the draws continue exactly
  and only the dropout streams are re-derived from (seed, rank, step).
- Stopping: a SIGTERM/SIGINT on any rank sets a flag that is all-reduced (max) after every step
  over the gloo group, so every rank stops after the same step and rank 0 saves. A repeated signal
  within a few seconds (torchrun forwards the signal it received to workers that may already have
  it) does not abort the save.
- Logging, the progress bar, TensorBoard, config.json and sample grids: rank 0 only.
"""
from __future__ import annotations

import torch

from .compiled_step import FastStep, _NoScheduler
from .dist import Context, all_reduce_mean
from .steps import Draws, draw_device, fused_step

# ------------------------------------------------------------------------------ DDP models
class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that exposes the wrapped UNet's label embedding, which
    ``steps.fused_step`` looks up (getattr) for the whole-batch label-drop Adam skip."""

    @property
    def label_embedding(self):
        return getattr(self.module, "label_embedding", None)


class EagerPair(torch.nn.Module):
    """The eager step's two forwards (h on y, h_bal on y_bal) as ONE module call, for DDP.

    h_bal is None when y_bal is None (no regulariser, or the whole batch dropped its labels).
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, y=None, y_bal=None, y_mask=None, augm=None):
        h = self.unet(x_t, t, y=y, y_mask=y_mask, augm=augm)
        h_bal = self.unet(x_t, t, y=y_bal, y_mask=y_mask, augm=augm) if y_bal is not None else None
        return h, h_bal


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool, stream=None) -> DDP:
    """``module`` in DistributedDataParallel. ``stream``: a CUDA stream to build it on, for a step that
    will be captured as a CUDA graph on that stream (DDP keeps the parameters' gradient accumulators,
    which remember the stream they were made on; see DistributedFastStep)."""
    ids = [device.index] if device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            ddp = wrap(module, device, find_unused_parameters)
        torch.cuda.current_stream(device).wait_stream(stream)
        return ddp
    # buffer syncing is left at its default: the UNet has no buffers (its sinusoidal table is a frozen
    # parameter), so there is nothing to broadcast (and torch 2.13 deprecates broadcast_buffers)
    return DDP(module, device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=find_unused_parameters)


# ------------------------------------------------------------------------------ draws
def rank_slice(ctx: Context, local_batch: int) -> slice:
    return slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)


def slice_draws(d: Draws, part: slice) -> Draws:
    """This rank's part of the global batch's draws (a 0-dim keep is shared by every sample)."""
    keep = d.keep if d.keep.ndim == 0 else d.keep[part]
    return Draws(d.t[part], d.noise[part], keep, None if d.y_bal is None else d.y_bal[part])


def draw_global(x_0: torch.Tensor, ctx: Context, class_cdf, T: int, drop_p: float, cb: bool,
                generator: torch.Generator, per_sample: bool = False) -> Draws:
    """``steps.draw_device`` for the whole global batch (the single process's exact call), sliced."""
    b = x_0.shape[0]
    B = b * ctx.world_size
    like = x_0[:1].expand(B, *x_0.shape[1:])  # the global batch's shape, device and dtype; no memory
    d = draw_device(B, like, class_cdf, T, drop_p, cb, generator=generator, per_sample=per_sample)
    return slice_draws(d, rank_slice(ctx, b))


DDP_GRAPH_WARMUP = 11  # DDP-enabled eager steps before a capture (PyTorch's CUDA-graph notes for DDP)


class DistributedFastStep(FastStep):
    """FastStep under DDP: global draws from a shared generator, the DDP module's forward, and the
    logged losses (and the finite-loss bookkeeping) on their all-reduced means, so every rank sees
    the same values and stops at the same step.

    No CUDA graph by default (the Trainer's setting; see the module docstring). ``cuda_graph=True``
    (experimental, used by ``bench train --ddp-cuda-graph``; not yet run on a GPU) captures the whole
    step, DDP's gradient all-reduce included, following PyTorch's recipe for DDP: the DDP module built on
    ``side_stream`` (``wrap(..., stream=side_stream)``), at least DDP_GRAPH_WARMUP eager steps on that
    stream, and the capture on it too; NCCL >= 2.9.6 captures collectives. The draw generator is
    registered with the graph, so every replay draws fresh t, noise, label drop and y_bal."""

    def __init__(self, model, ddp_model, generator: torch.Generator, ctx: Context, *args, cuda_graph: bool = False,
                 side_stream=None, **kwargs):
        if cuda_graph:
            if side_stream is None:
                raise ValueError("cuda_graph=True under DDP needs side_stream: the stream the DDP module was "
                                 "built on (distributed.wrap(..., stream=side_stream))")
            kwargs["warmup"] = max(int(kwargs.get("warmup", 3)), DDP_GRAPH_WARMUP)
        super().__init__(model, *args, cuda_graph=cuda_graph, side_stream=side_stream, **kwargs)
        self.generator, self.ctx = generator, ctx
        self.forward_model = (torch.compile(ddp_model, dynamic=False, **(kwargs.get("compile_options") or {}))
                              if self.backend == "compiled" else ddp_model)

    def _graph_generators(self) -> list:
        return [self.generator] if self.generator.device.type == "cuda" else []

    def _body(self, x_0, y, augm=None):
        d = draw_global(x_0, self.ctx, self.class_cdf, self.schedule.T, self.drop_p, self.cb,
                        self.generator, per_sample=self.per_sample)
        out = fused_step(self.forward_model, self.ema, self.optimizer, _NoScheduler, self.schedule, x_0, y, d,
                         self.cfg, ema_tensors=self.pairs, augm=augm)
        terms = all_reduce_mean(torch.stack([out["loss"], out["loss_ddpm"], out["loss_reg"]]))
        out = {"loss": terms[0], "loss_ddpm": terms[1], "loss_reg": terms[2]}
        self._count.add_(1)
        bad = ~torch.isfinite(out["loss"]) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self._count, self.first_bad))
        return out

