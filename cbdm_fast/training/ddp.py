"""Data-parallel training under torchrun: the same algorithm as one process, the global batch split.

    torchrun --standalone --nproc_per_node N -m cbdm_fast.train --batch-size 48 ...

``--batch-size`` is the GLOBAL batch; each of the N ranks trains on batch_size / N images of it
(an error names both numbers when N does not divide it). The process group is cbdm_fast/dist.py's;
what each rank does with it, and why:

- Data: every rank draws the same epoch permutation (and flips, and ADA parameters) from the shared
  seed and takes its own contiguous slice of each global batch (``BatchStream(rank=, world_size=)``,
  ``rank_slice``): the union over ranks is the single-process batch, and resume is exact.
- Random draws: t, noise, the label drop and y_bal are drawn for the WHOLE global batch on every
  rank (``rank_draws``), from "draw" generators that start in the state the single process's default
  generators have after model initialisation (``draw_generators``), and each rank keeps its slice.
  So the label drop is one draw per global batch on which all ranks agree (as in the authors'
  algorithm), and a run on N ranks draws exactly the randomness of the single process
  (tests/training/test_ddp.py compares them). The default generators, which now drive only dropout,
  are re-seeded per rank (``dist.rank_seed``) so dropout masks are independent across ranks. With
  dropout > 0 the N-rank run is the same algorithm with different dropout masks; with dropout 0 it
  matches the single process up to fp32 reduction order.
- Gradients: each rank's loss is the mean over its slice; DDP averages the gradients, which is the
  gradient of the global-batch mean (equal slices). Clipping, Adam and EMA then see identical
  gradients on every rank, so parameters and EMA stay identical without further communication.
  The logged losses are all-reduced means (one 3-element collective per step, on the device): the
  steps' ``reduce`` hook.
- The label embedding on a whole-batch label drop: the fused/compiled step keeps it in the graph
  (its output times keep = 0, an exact-zero gradient; ``step._AdamSkip`` undoes Adam's move), so
  DDP runs with find_unused_parameters=False. The eager step (the authors' two forwards) does not
  use it at all then, so its DDP uses find_unused_parameters=True (DDP marks the unused parameter
  ready instead of waiting for it forever), and the step sets its gradient to None afterwards so
  Adam skips it, exactly as the single process does. Both forwards run inside one DDP forward
  (``PairedLoss``) because DDP expects one forward per backward.
- Compiled backend: torch.compile of the DDP-wrapped BatchedLoss; the one-CUDA-graph-per-step capture is off
  under DDP in training (whole-step capture of NCCL collectives is experimental: ``bench train
  --ddp-cuda-graph`` builds the DDP module on the capture stream and warms up DDP_GRAPH_WARMUP steps).
- Checkpoints (training/state.py): written by rank 0 only, atomically, followed by a barrier. They
  hold the draw generators' states under rng["cpu"]/rng["cuda"] (the same keys as a single-process
  checkpoint, whose default generators play that role) and every rank's own (dropout) generator
  states under rng["ranks"]. Resuming on the same number of ranks is exact; on another number of
  ranks (or in one process) the data and the draws continue exactly and only the dropout streams are
  re-derived from (seed, rank, step).
- Stopping: a SIGTERM/SIGINT on any rank sets a flag that is all-reduced (max) after every step
  over the gloo group, so every rank stops after the same step and rank 0 saves. A repeated signal
  within a few seconds (torchrun forwards the signal it received to workers that may already have
  it) does not abort the save.
- Logging, the progress bar, TensorBoard, config.json and sample grids: rank 0 only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import dist
from ..dist import Context
from ..losses import cbdm_loss
from .draws import Draws
from .step import BatchedLoss, StepConfig

DDP_GRAPH_WARMUP = 11  # DDP-enabled eager steps before a capture (PyTorch's CUDA-graph notes for DDP)


class PairedLoss(torch.nn.Module):
    """``losses.cbdm_loss`` on ``model`` as ONE module call (both forwards, h on y and h_bal on y_bal),
    so that DDP, which expects one forward per backward, can wrap the eager step's loss."""

    def __init__(self, model: torch.nn.Module, schedule):
        super().__init__()
        self.model, self.schedule = model, schedule

    def forward(self, x_0, y, t, noise, y_bal=None, tau=1.0, augm=None, y_mask=None):
        return cbdm_loss(self.model, self.schedule, x_0, y, t, noise, y_bal=y_bal, tau=tau, augm=augm, y_mask=y_mask)


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool,
         stream=None) -> DistributedDataParallel:
    """``module`` in DistributedDataParallel. ``stream``: a CUDA stream to build it on, for a step that
    will be captured as a CUDA graph on that stream (DDP keeps the parameters' gradient accumulators,
    which remember the stream they were made on)."""
    ids = [device.index] if device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            ddp = wrap(module, device, find_unused_parameters)
        torch.cuda.current_stream(device).wait_stream(stream)
        return ddp
    # buffer syncing is left at its default: the UNet has no buffers (its sinusoidal table is a frozen
    # parameter), so there is nothing to broadcast (and torch 2.13 deprecates broadcast_buffers)
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def wrap_step(model: torch.nn.Module, schedule, device: torch.device, cfg: StepConfig, eager: bool,
              stream=None) -> DistributedDataParallel:
    """The DDP module a data-parallel step runs through. eager: PairedLoss, whose whole-batch label drop
    leaves the label embedding unused (find_unused_parameters: DDP must not wait for it); fast: the fused
    step's BatchedLoss (on cfg's kernels), where the embedding stays in the graph with an exact-zero
    gradient (every parameter is used). stream: as ``wrap``'s, for a fast step captured as a CUDA graph."""
    if eager:
        return wrap(PairedLoss(model, schedule), device, find_unused_parameters=True)
    return wrap(BatchedLoss(model, schedule, cfg), device, find_unused_parameters=False, stream=stream)


def draw_generators(ctx: Context, device: torch.device, seed: int) -> tuple[Optional[torch.Generator], ...]:
    """(host, device) generators of the step's draws. One process: (None, None), the default generators.
    Data parallel: clones of the default generators' states now (after model initialisation, so every
    rank draws what one process would), and the default generators re-seeded per rank for dropout."""
    if not ctx.enabled:
        return None, None
    host = dist.clone_generator(torch.get_rng_state(), torch.device("cpu"))
    on_device = host if device.type == "cpu" else dist.clone_generator(torch.cuda.get_rng_state(device), device)
    torch.manual_seed(dist.rank_seed(seed, ctx.rank))
    return host, on_device


def rank_slice(ctx: Context, local_batch: int) -> slice:
    """This rank's rows of the global batch."""
    return slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)


def slice_draws(d: Draws, part: slice) -> Draws:
    """This rank's part of the global batch's draws (a 0-dim keep is shared by every sample)."""
    keep = d.keep if d.keep.ndim == 0 else d.keep[part]
    return Draws(d.t[part], d.noise[part], keep, None if d.y_bal is None else d.y_bal[part])


def rank_draws(draw: Callable[[torch.Tensor], Draws], ctx: Context) -> Callable[[torch.Tensor], Draws]:
    """x_0 (this rank's slice) -> this rank's Draws: ``draw`` over the global batch's shape (the single
    process's exact call; ``draw`` is one of training/draws.py's, bound to its arguments and generators),
    then sliced. One process: ``draw`` itself."""
    if not ctx.enabled:
        return draw

    def draw_this_rank(x_0: torch.Tensor) -> Draws:
        b = x_0.shape[0]
        like = x_0[:1].expand(b * ctx.world_size, *x_0.shape[1:])  # the global batch's shape; no memory
        return slice_draws(draw(like), rank_slice(ctx, b))
    return draw_this_rank
