"""A sampling job worked out from its request, identically on every rank: the model, the labels, the
output paths and the shard plan (``prepare``), then the sampler on this rank's device (``build_sampler``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import ops
from ..files.models import load_model
from ..files.paths import PathError, check_output_file
from ..samplers import class_balanced_labels, make_sampler, uniform_labels
from ..samplers.dpm_solver import DEFAULT_STEPS, default_spacing, dpm_solver_timesteps
from ..samplers.noise import MAX_SAMPLES
from ..schedule import Schedule
from .request import SampleError, SampleRequest
from .shards import ShardRun, shards_folder, weights_digest


@dataclass
class Job:
    """What one run samples and where it goes."""
    model: object
    info: dict              # load_model's description of the checkpoint
    device: torch.device
    labels: torch.Tensor    # int64 (n,): every image's label, -1 for uncond
    n: int
    omega: float            # 0 unless method is cfg
    steps: int              # the sampler's steps (T for ddpm)
    eta: float
    spacing: str            # dpm++2m's grid ('' for the other samplers)
    size: int
    in_ch: int
    num_class: int
    out: Path
    grid: Path
    run: ShardRun           # not opened yet


def default_shard_size(batch_size: int) -> int:
    """A multiple of the batch size near 2048 images (at least one batch)."""
    return batch_size * max(1, round(2048 / batch_size))


def run_key(req: SampleRequest, info, model, omega, steps, eta, spacing, n, shard_size, digest) -> dict:
    """Everything that changes the images of a run, keyed by the flag to name when it differs (--schedule
    only for dpm++2m, so the shard folders of the other samplers keep the key they were written with)."""
    key = {"--ckpt (its weights)": digest, "--which": req.which, "model": info["unet"],
            "--image-size": info["image_size"] or 32, "--T": model.config["T"],
            "beta": [info["beta_1"], info["beta_T"]], "--method": req.method, "--omega": omega,
            "--var-type": req.var_type, "--clip-x0": bool(req.clip_x0), "--sampler": req.sampler,
            "--steps": steps, "--eta": eta, "--seed": req.seed, "--per-class": req.per_class,
            "--num-samples": None if req.per_class is not None else n, "--labels": req.labels,
            "--backend": req.backend, "--no-amp": not req.amp, "--patch-model": bool(req.patch_model),
            "--shard-size": shard_size}
    if spacing:
        key["--schedule"] = spacing
    return key


def sampling_steps(req: SampleRequest, schedule: Schedule) -> tuple:
    """(steps, eta, spacing) of the sampler; SampleError for a --steps or --schedule this model cannot run."""
    T = schedule.T
    if req.sampler == "ddpm":
        if req.steps is not None and req.steps != T:
            raise SampleError(f"--steps {req.steps}: --sampler ddpm always runs all T = {T} steps of this "
                              f"model; use --sampler ddim or dpm++2m for fewer steps (or drop --steps)")
        return T, 0.0, ""
    if req.sampler == "dpm++2m":
        steps = req.steps if req.steps is not None else min(DEFAULT_STEPS, T - 1)
        spacing = req.spacing or default_spacing(schedule, steps)
        try:
            dpm_solver_timesteps(schedule, steps, spacing)
        except ValueError as exc:
            raise SampleError(f"--steps {steps} with --schedule {spacing}: {exc}") from None
        return steps, 0.0, spacing
    steps = req.steps if req.steps is not None else min(100, T)
    if steps > T:
        raise SampleError(f"--steps {steps}: at most T = {T} steps for this model")
    return steps, 0.0 if req.eta is None else req.eta, ""


def run_labels(req: SampleRequest, n_class: int):
    """(n, labels): class-balanced, i.i.d. uniform from the seed, or none (-1) for uncond. SampleError for
    more images than the counter-based noise can index."""
    n = req.per_class * n_class if req.per_class is not None else req.num_samples
    if n > MAX_SAMPLES:
        raise SampleError(f"{n} images: at most {MAX_SAMPLES} (2^26) per run, the sample indices of the "
                          f"counter-based noise; make several runs with different --seed")
    if req.per_class is not None:
        labels = class_balanced_labels(req.per_class, n_class)
    else:
        labels = uniform_labels(n, n_class, generator=torch.Generator().manual_seed(req.seed))
    if req.method == "uncond":
        labels = torch.full((n,), -1, dtype=torch.int64)
    return n, labels.to(torch.int64)


def check_output(flag: str, path) -> Path:
    """An output file of the job, checked before any sampling: not a folder, its folder writable or
    creatable (SampleError naming the flag)."""
    try:
        return check_output_file(path, flag, example="samples.npz" if flag == "--out" else "grid.png")
    except PathError as exc:
        raise SampleError(str(exc)) from None


def output_paths(req: SampleRequest, omega: float, n: int) -> tuple:
    """(out, grid) checked, with their folders created; SampleError when they cannot be written."""
    out = check_output("--out", req.out if req.out else
                       Path(req.ckpt).parent / f"samples_{req.method}_w{omega:g}_{n}.npz")
    grid = check_output("--grid", req.grid if req.grid else out.with_suffix(".png"))
    try:
        for p in (out, grid):
            p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SampleError(f"cannot create the output folder: {exc}") from None
    return out, grid


def prepare(req: SampleRequest, device: torch.device, note: Callable[[str], None]) -> Job:
    """Load the model (on the CPU) and work out the run: labels, paths and shard plan. SampleError on a
    user error. Every rank does the same (the same files and arguments), before any shard is touched."""
    for flag, path in (("--out", req.out), ("--grid", req.grid)):  # before the model is loaded
        if path is not None:
            check_output(flag, path)
    try:
        if req.step_backend == "extension" and not ops.extension_available():
            from ..ops import _extension  # why it is not available

            raise SampleError(f"--step-backend extension: {_extension.unavailable_reason()}")
        model, info = load_model(req.ckpt, which=req.which, flagfile=req.flagfile, model_kwargs=req.model_kwargs)
    except ValueError as exc:  # CheckpointError (a ValueError)
        raise SampleError(str(exc)) from None

    if req.method != "uncond" and model.label_embedding is None:
        raise SampleError(f"--method {req.method} needs a class-conditional model, but this checkpoint's model "
                          f"is unconditional (no label embedding): use --method uncond")
    omega = req.omega
    if req.method != "cfg" and omega != 0:
        note(f"note: --omega applies to --method cfg only; sampling with --method {req.method} "
             f"(recorded as omega 0)")
        omega = 0.0
    num_class, in_ch, T = model.num_class, model.in_ch, model.config["T"]
    steps, eta, spacing = sampling_steps(req, Schedule(T, info["beta_1"], info["beta_T"]))
    size = info["image_size"] or 32
    down = 2 ** (len(model.config["ch_mult"]) - 1)
    if size % down:
        raise SampleError(f"image size {size} is not a multiple of {down} (the UNet downsamples "
                          f"{len(model.config['ch_mult']) - 1} times): check --image-size")
    n, labels = run_labels(req, num_class)
    out, grid = output_paths(req, omega, n)

    shard_size = req.shard_size or default_shard_size(req.batch_size)
    key = run_key(req, info, model, omega, steps, eta, spacing, n, shard_size, weights_digest(model.state_dict()))
    run = ShardRun(shards_folder(out), key, n, shard_size, (size, size, in_ch))
    return Job(model, info, device, labels, n, omega, steps, eta, spacing, size, in_ch, num_class, out, grid, run)


def build_sampler(job: Job, req: SampleRequest):
    """The model on its device and the sampler (after the shard folder is checked, as it takes a while
    on a GPU); SampleError for a sampler option this model or device cannot run."""
    job.model = job.model.to(job.device)
    T = job.model.config["T"]
    schedule = Schedule(T, job.info["beta_1"], job.info["beta_T"], device=job.device)
    kwargs = dict(seed=req.seed, sampler=req.sampler, steps=None if req.sampler == "ddpm" else job.steps,
                  eta=job.eta, omega=job.omega, method=req.method, var_type=req.var_type, clip_x0=req.clip_x0,
                  spacing=job.spacing or None)
    if req.backend == "fast":
        kwargs.update(amp=None if req.amp else False, cuda_graph=None if req.cuda_graph else False,
                      channels_last=req.channels_last, step_backend=req.step_backend or "auto",
                      patch=req.patch_model, compile=req.compile)
    try:
        return make_sampler(req.backend, job.model, schedule, (job.in_ch, job.size, job.size), **kwargs)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
