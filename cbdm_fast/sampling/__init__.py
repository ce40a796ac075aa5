"""Sampling jobs: a checkpoint's images drawn in resumable shards, over any number of torchrun ranks.

    request.py   SampleRequest: what to draw and where (python -m cbdm_fast.sample's flags), SampleError
    run.py       run_sampling(request): the job on this rank, its exit status
    job.py       the model, labels, paths and shard plan of a request; its sampler
    ranks.py     how the ranks agree on errors and on the shard folder
    shards.py    ShardRun: the shard folder and its manifest; which shards a rank samples
    outputs.py   the merged .npz and the PNG grid
    progress.py  the progress bar
"""
from .request import SampleError, SampleRequest
from .run import run_sampling

__all__ = ["SampleError", "SampleRequest", "run_sampling"]
