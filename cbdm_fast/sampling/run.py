"""``run_sampling``: a whole sampling job on this process, and under torchrun on every rank.

Rank 0 opens (or checks) the shard folder, then rank r samples the r-th, (r + N)-th, ... pending
shards on its device (cuda:LOCAL_RANK; gloo on a CPU) and writes each one as it finishes; once every
rank is done, rank 0 merges the shards in global index order and writes the .npz and the grid. Images
depend on (seed, global index) only, so any number of ranks, one included, gives the single-process
output, and a killed run resumes with the same request on any number of ranks.

Errors: a user error found by any rank before sampling (checkpoint, options, a shard folder of another
run) stops every rank with exit status 2 and one message from rank 0; an error while sampling is
printed by its rank ("[rank r] error: ...") and stops the run once the others have written their
shards. Only rank 0 reports; its progress bar counts its own shards.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

from .. import dist
from ..files.images import to_uint8
from ..interrupts import EXIT_INTERRUPTED, reason as interrupt_reason, sigterm_interrupts
from ..model import count_parameters
from .job import Job, build_sampler, prepare
from .outputs import write_outputs
from .progress import Progress
from .ranks import agreed, open_shards, report_error
from .request import SampleError, SampleRequest
from .shards import rank_shards

# Under torchrun the ranks that finish their shards first wait for the slowest one at the final
# gather, which can last as long as sampling a few shards (or a whole resumed run on an idle rank).
# A rank that fails reports through that gather or exits (and torchrun then stops the others), so
# this timeout only bounds a rank that is stuck.
WAIT_TIMEOUT_S = 24 * 3600.0


def _print(msg: str) -> None:
    print(msg, flush=True)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _quiet(msg: str) -> None:
    """What ranks other than 0 say: under torchrun only rank 0 reports."""


def run_sampling(req: SampleRequest, say: Callable[[str], None] = _print) -> int:
    """Run the job ``req`` describes on this rank (torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else one
    process); its exit status: 0, 2 (a user error, its message printed on stderr) or 130 (interrupted by
    Ctrl-C or SIGTERM, within a sampling step; the finished shards are kept). ``say`` takes rank 0's
    report (stdout by default)."""
    try:
        ctx = dist.from_env()
    except ValueError as exc:
        return report_error(str(exc))
    try:
        with sigterm_interrupts():
            code = _run_on_rank(req, ctx, say if ctx.is_main else _quiet)
        if ctx.enabled and code == 0:
            # leave together: a rank that tore its gloo group down while rank 0 was still merging the shards
            # was seen to abort at exit now and then (SIGABRT in gloo's teardown)
            dist.barrier()
        return code
    except KeyboardInterrupt as exc:  # before or after sampling (during it, _run_on_rank says what is kept)
        if ctx.is_main:
            print(f"interrupted{interrupt_reason(exc)}: any finished shards are kept; run the same command again "
                  f"to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        dist.cleanup()


def _run_on_rank(req: SampleRequest, ctx, say) -> int:
    # Join the group. Before it, each rank checks its own device (a bad device fails alike everywhere).
    try:
        ctx, device = dist.setup(dist.resolve_device(req.device), timeout_s=WAIT_TIMEOUT_S)
    except ValueError as exc:
        return report_error(str(exc), ctx)

    # Work out the job, open the shard folder, build the sampler: an error on any rank stops every rank.
    try:
        job = agreed(prepare, req, device, _note if ctx.is_main else _quiet)
        pending = open_shards(job.run, ctx)
        sampler = agreed(build_sampler, job, req)
    except SampleError as exc:  # raised on every rank alike (agreed); rank 0 says why
        return report_error(str(exc)) if ctx.is_main else 2

    # Sample this rank's share of the pending shards, writing each one as it finishes.
    describe(job, req, ctx, pending, say)
    mine = rank_shards(pending, ctx.rank, ctx.world_size)
    progress = Progress(images_in(job, mine), job.steps, not req.progress or not ctx.is_main,
                        "sampling" + (" (rank 0)" if ctx.enabled else ""))
    try:
        error = sampling_error(job, sampler, mine, req, ctx, progress)
    except KeyboardInterrupt as exc:
        if ctx.is_main:
            left = len([i for i in pending if not job.run.complete(i)])
            again = ("the same torchrun command again (with any number of ranks)" if ctx.enabled
                     else "the same command again")
            print(f"interrupted{interrupt_reason(exc)}: {len(job.run.shards) - left} of {len(job.run.shards)} shards "
                  f"are in {job.run.folder}; run {again} to resume", file=sys.stderr)
        return EXIT_INTERRUPTED

    # Wait for every rank; rank 0 merges the shards into the outputs.
    if not ctx.enabled and error is not None:
        return report_error(error)
    errors = dist.all_gather_object(error)  # also the barrier before the merge
    elapsed = time.perf_counter() - progress.start
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        if ctx.is_main:
            detail = errors[0] if failed[0] == 0 else f"sampling failed on rank {failed[0]} (its message is above)"
            report_error(f"{detail}; the finished shards are kept in {job.run.folder}: run the same command again "
                         f"to resume")
        return 2
    if not ctx.is_main:
        return 0
    try:
        write_outputs(job, req)
    except SampleError as exc:
        return report_error(str(exc))
    if not req.keep_shards:
        job.run.remove()
    sampled = images_in(job, pending)
    rate = f"{sampled / elapsed:.2f} samples/s" if sampled and elapsed > 0 else "nothing left to sample"
    say(f"wrote {job.n} images to {job.out} and the grid {job.grid} ({elapsed:.1f} s, {rate})")
    return 0


def sample_shards(job: Job, sampler, shards: list, batch_size: int, method: str, progress: Progress) -> None:
    """Sample the given shards, in batches of batch_size from each shard's start, and write each one."""
    for i in shards:
        lo, hi = job.run.shards[i]
        shard = np.empty((hi - lo, job.size, job.size, job.in_ch), dtype=np.uint8)
        for first in range(lo, hi, batch_size):
            b = min(batch_size, hi - first)
            index = torch.arange(first, first + b)
            y = None if method == "uncond" else job.labels[first:first + b]
            x_0 = sampler(y, index, progress=progress.batch(b))
            shard[first - lo:first - lo + b] = to_uint8(x_0)
        job.run.write(i, shard, job.labels[lo:hi].numpy())


def sampling_error(job: Job, sampler, shards: list, req: SampleRequest, ctx, progress: Progress) -> Optional[str]:
    """Sample this rank's shards; None, or the message of a user-facing error (printed at once on ranks
    other than 0, whose errors rank 0 reports only once every rank is done). KeyboardInterrupt goes up."""
    try:
        sample_shards(job, sampler, shards, req.batch_size, req.method, progress)
        return None
    except torch.cuda.OutOfMemoryError:
        error = f"out of GPU memory at --batch-size {req.batch_size}: use a smaller --batch-size"
    except OSError as exc:
        error = f"cannot write a shard into {job.run.folder}: {exc}"
    finally:
        progress.close()
    if not ctx.is_main:
        report_error(error, ctx)
    return error


def describe(job: Job, req: SampleRequest, ctx, pending: list, say) -> None:
    info, T = job.info, job.model.config["T"]
    say(f"model: UNet {count_parameters(job.model) / 1e6:.2f}M parameters ({req.which} weights), configured "
        f"from {info['source']}; {job.num_class} classes, {job.in_ch}x{job.size}x{job.size}, T={T}")
    sampler_text = {"ddpm": f"ddpm ({T} steps, var {req.var_type})",
                    "ddim": f"ddim ({job.steps} steps, eta {job.eta:g})",
                    "dpm++2m": f"dpm++2m ({job.steps} steps, {job.spacing} grid)"}[req.sampler]
    device = f"{ctx.world_size} ranks on {job.device.type}" if ctx.enabled else f"device {job.device}"
    say(f"sampling {job.n} images: {sampler_text}, method {req.method}, omega {job.omega:g}, clip_x0 "
        f"{req.clip_x0}, seed {req.seed}, batch {req.batch_size}, backend {req.backend}, {device}")
    done = len(job.run.shards) - len(pending)
    if done:
        say(f"resuming: {done} of {len(job.run.shards)} shards already in {job.run.folder}")
    if ctx.enabled:
        say(f"data parallel: {len(pending)} shards to sample over {ctx.world_size} ranks (rank r samples the "
            f"pending shards r, r + {ctx.world_size}, ...); the progress bar shows rank 0's own")


def images_in(job: Job, shards: list) -> int:
    return sum(job.run.shards[i][1] - job.run.shards[i][0] for i in shards)
