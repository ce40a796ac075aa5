"""What a checkpoint holds to continue a run bit-exactly, how it is written and rotated, and the weights a
fine-tuned run starts from.

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
from ..files.models import model_config, model_state, weights_mismatch


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


class NotResumable(ckpt_io.CheckpointError):
    """A readable checkpoint that is not one of our training checkpoints (e.g. the authors')."""


def load_resumable(path) -> dict:
    """One of our training checkpoints, loaded (CheckpointError; NotResumable naming --resume for a
    readable file of another kind)."""
    state = ckpt_io.load(path)
    if not ckpt_io.is_ours(state):
        raise NotResumable(f"--resume {path}: not a cbdm_fast training checkpoint "
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


def save_checkpoint(state: dict, logdir, keep: int, is_main: bool, log: Callable[[str], None]) -> Path:
    """Write ckpt_<step>.pt atomically, then keep the newest ``keep`` that verify (files/checkpoint.py's
    ``rotate``: never the one just written among the deleted; a torn or altered one is moved to
    <logdir>/corrupt/ and reported through ``log``). Under data parallelism call on every rank: rank 0
    writes, then all wait at a barrier so no rank runs ahead of (or exits before) the file."""
    logdir = Path(logdir)
    path = ckpt_io.checkpoint_path(logdir, state["step"])
    if is_main:
        ckpt_io.remove_stale_temporaries(logdir)  # left by a run killed while it wrote
        ckpt_io.save_atomic(state, path)
        ckpt_io.rotate(logdir, keep, path, log=log)
    dist.barrier()
    return path


def load_finetune_weights(model, path, unet_kwargs: dict) -> None:
    """--finetune-from: ``model`` starts from the EMA weights of a checkpoint (ours or the authors');
    CheckpointError naming the flag, in a few lines, for one that is not a model checkpoint or does not fit."""
    try:
        ckpt = ckpt_io.load(path)
        weights = model_state(ckpt, which="ema")
    except ckpt_io.CheckpointError as exc:
        raise type(exc)(f"--finetune-from {path}: {exc}") from None
    problem = weights_mismatch(model.state_dict(), weights)
    if problem:
        theirs = model_config(ckpt) or {}
        differ = [f"{k}={theirs[k]!r} (here {v!r})" for k, v in unet_kwargs.items() if k in theirs and theirs[k] != v]
        stored = f"\nthe checkpoint's UNet has {', '.join(differ)}" if differ else ""
        raise ckpt_io.CheckpointError(
            f"--finetune-from {path}: its weights do not fit the model configured here (check --ch, --ch-mult, "
            f"--attn, --num-res-blocks and the data set's class count):\n{problem}{stored}")
    model.load_state_dict(weights, strict=True)
