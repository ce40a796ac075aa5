"""What a checkpoint holds to continue a run bit-exactly, and how it is written.

The state: step, config, the UNet's arguments, model, EMA, optimizer, scheduler, the data stream, and
the random generators. Single process: the default generators (they drive the draws and dropout).
Data parallel (training/ddp.py): the draw generators under the same keys, so either kind of checkpoint
continues in either kind of run, plus every rank's own (dropout) generators under 'ranks'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dist
from ..dist import Context
from ..files import checkpoint as ckpt_io


def rng_state(ctx: Context, device: torch.device, host: Optional[torch.Generator],
              on_device: Optional[torch.Generator]) -> dict:
    """The generators' states. Data parallel (a collective): ``host``/``on_device`` are the draw
    generators (ddp.draw_generators); one process: they are None and the default ones are saved."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if not ctx.enabled:
        return own
    rng = {"cpu": host.get_state()}
    if device.type == "cuda":
        rng["cuda"] = on_device.get_state()
    rng["ranks"] = dist.all_gather_object(own)
    rng["world_size"] = ctx.world_size
    return rng


def load_rng_state(rng: dict, ctx: Context, device: torch.device, host: Optional[torch.Generator],
                   on_device: Optional[torch.Generator], seed: int, step: int, log: Callable[[str], None]) -> None:
    """Restore what ``rng_state`` saved, from a checkpoint of one process or of any number of ranks."""
    if not ctx.enabled:  # a data-parallel checkpoint's draw streams continue here
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        return
    host.set_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        on_device.set_state(rng["cuda"])
    ranks = rng.get("ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        own = ranks[ctx.rank]
        torch.set_rng_state(own["cpu"])
        if device.type == "cuda" and "cuda" in own:
            torch.cuda.set_rng_state(own["cuda"], device)
    else:  # another world size: data and draws continue exactly; dropout streams are re-derived
        torch.manual_seed(dist.rank_seed(seed, ctx.rank, step))
        log(f"note: the checkpoint was written by {len(ranks) if ranks else 1} process(es), this run has "
            f"{ctx.world_size}: data order and random draws continue exactly, dropout streams restart")


def load_resumable(path) -> dict:
    """One of our training checkpoints, loaded (CheckpointError naming --resume for anything else)."""
    state = ckpt_io.load(path)
    if not ckpt_io.is_ours(state):
        raise ckpt_io.CheckpointError(f"--resume {path}: not a cbdm_fast training checkpoint "
                                      f"(to start from the authors' weights use --finetune-from)")
    return state


def training_state(step: int, cfg, unet_kwargs: dict, image_size: int, model, ema, optimizer, scheduler,
                   rng: dict, stream) -> dict:
    """The checkpoint's dictionary (files/checkpoint.py's FORMAT)."""
    return {"format": ckpt_io.FORMAT, "step": step, "config": cfg.to_dict(),
            "unet": dict(unet_kwargs), "image_size": image_size,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng, "data": stream.state_dict()}


def load_training_state(state: dict, model, ema, optimizer, scheduler, stream) -> int:
    """Load a checkpoint's weights, optimizer, scheduler and data position; returns its step (the
    generators are ``load_rng_state``'s)."""
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    return int(state["step"])


def save_checkpoint(state: dict, logdir, keep: int, is_main: bool) -> Path:
    """Write ckpt_<step>.pt atomically and keep the newest ``keep``; under data parallelism call on every
    rank: rank 0 writes, then all wait at a barrier so no rank runs ahead of (or exits before) the file."""
    logdir = Path(logdir)
    path = ckpt_io.checkpoint_path(logdir, state["step"])
    if is_main:
        ckpt_io.remove_stale_temporaries(logdir)  # left by a run killed while it wrote
        ckpt_io.save_atomic(state, path)
        for old in ckpt_io.find_checkpoints(logdir)[:-keep]:
            old.unlink(missing_ok=True)
    dist.barrier()
    return path
