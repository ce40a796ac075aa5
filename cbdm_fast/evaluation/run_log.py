"""A training run's curves for the evaluation report: the losses from its TensorBoard log and the
metrics of evaluation during training (``eval.jsonl``), both read from the run folder.

A resumed run writes a new event file and may repeat steps; for each step the last value written wins.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

LOSS_TAGS = ("train/loss", "train/loss_ddpm", "train/loss_reg")
EVAL_KEYS = ("fid", "recall", "precision", "accuracy")

Curve = tuple[list[int], list[float]]


def find_run_dir(meta: dict, explicit: Optional[str] = None) -> Optional[Path]:
    """The training run folder: ``explicit`` (--run-dir), else the folder of the checkpoint the samples
    came from (recorded in the .npz by the sampler) when it holds a TensorBoard log or eval.jsonl."""
    if explicit:
        return Path(explicit)
    ckpt = meta.get("ckpt")
    if not ckpt:
        return None
    folder = Path(str(ckpt)).parent
    if folder.is_dir() and (any(folder.glob("events.out.tfevents.*")) or (folder / "eval.jsonl").is_file()):
        return folder
    return None


def _last_per_step(pairs) -> Curve:
    by_step = {}
    for step, value in pairs:
        by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_curves(run_dir) -> dict[str, Curve]:
    """{tag: (steps, values)} of the training losses logged to TensorBoard; {} without a log (or
    without the tensorboard package)."""
    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    # No purging, and the last write of a step decided by wall time: TensorBoard reads a folder's event
    # files in name order, which puts "...<pid>.10" before "...<pid>.9" (the writer counter is not
    # zero-padded), and its out-of-order purge would then drop the resumed run's values.
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return {tag: _last_per_step((e.step, e.value) for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time))
            for tag in LOSS_TAGS if tag in tags}


def eval_curves(run_dir) -> dict[str, Curve]:
    """{metric: (steps, values)} from <run_dir>/eval.jsonl; unreadable lines (a killed write) are skipped."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        return {}
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    out = {}
    for key in EVAL_KEYS:
        pairs = [(r["step"], r[key]) for r in records if isinstance(r, dict) and "step" in r
                 and isinstance(r.get(key), (int, float))]
        if pairs:
            out[key] = _last_per_step(pairs)
    return out
