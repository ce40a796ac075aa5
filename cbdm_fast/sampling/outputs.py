"""What a finished sampling job leaves (rank 0): the merged .npz of every image with the run's
settings, and the PNG grid beside it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files.atomic import atomic_write
from ..files.images import make_grid, save_png
from .job import Job
from .request import SampleError, SampleRequest

GRID_MAX = 10  # rows and columns of the PNG grid


def grid_indices(labels: np.ndarray, per_class, num_class: int, conditional: bool):
    """(indices into the samples, images per row) of the PNG grid: with per_class one row per class
    (at most GRID_MAX classes, evenly spaced from head to tail) of at most GRID_MAX images; else the
    first GRID_MAX^2 images, sorted by label, GRID_MAX per row."""
    n = len(labels)
    if per_class is not None and conditional:
        classes = np.unique(np.round(np.linspace(0, num_class - 1, min(num_class, GRID_MAX))).astype(int))
        cols = min(per_class, GRID_MAX)
        return [c * per_class + j for c in classes for j in range(cols)], cols
    first = np.arange(min(n, GRID_MAX * GRID_MAX))
    if conditional:
        first = first[np.argsort(labels[first], kind="stable")]
    return first.tolist(), min(n, GRID_MAX)


def write_outputs(job: Job, req: SampleRequest) -> None:
    """Merge the shards in global index order; write the .npz and the PNG grid."""
    try:
        images, labels = job.run.merge()
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    if not np.array_equal(labels, job.labels.numpy()):
        raise SampleError(f"the shards in {job.run.folder} hold other labels than this run's: delete the folder "
                          f"and run again")
    arrays = dict(images=images, labels=labels, omega=np.float64(job.omega), method=np.str_(req.method),
                  var_type=np.str_(req.var_type), clip_x0=np.bool_(req.clip_x0), seed=np.int64(req.seed),
                  which=np.str_(req.which), ckpt=np.str_(str(Path(req.ckpt))), sampler=np.str_(req.sampler),
                  steps=np.int64(job.steps), eta=np.float64(job.eta), backend=np.str_(req.backend))
    if job.spacing:  # dpm++2m's grid (--schedule)
        arrays["schedule"] = np.str_(job.spacing)
    try:
        atomic_write(job.out, lambda f: np.savez(f, **arrays))
        idx, nrow = grid_indices(labels, req.per_class, job.num_class, req.method != "uncond")
        save_png(make_grid(images[idx], nrow), job.grid, upscale=max(1, 32 // job.size))
    except OSError as exc:
        raise SampleError(f"cannot write the output: {exc}") from None
