"""``SampleRequest``: what a sampling job draws and where it writes it, as python -m cbdm_fast.sample's
flags say it (same names, same defaults); filled by that CLI, or by evaluate --ckpt, never as an argv."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class SampleError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2, no traceback."""


@dataclass
class SampleRequest:
    ckpt: str                           # our checkpoint or the authors' ckpt_*.pt
    per_class: Optional[int] = None     # exactly N images of every class (give this or num_samples)
    num_samples: Optional[int] = None   # N images with i.i.d. uniform labels
    labels: Optional[str] = None        # with num_samples: 'uniform' (the default protocol, recorded as given)
    which: str = "ema"                  # EMA weights or the raw trained ones ('model')
    flagfile: Optional[str] = None      # the authors' flagfile.txt (default: beside ckpt)
    model_kwargs: dict = field(default_factory=dict)  # model flags overriding the checkpoint's configuration
    method: str = "cfg"                 # samplers.GUIDANCE
    omega: float = 0.0
    var_type: str = "fixedlarge"
    clip_x0: bool = False
    sampler: str = "ddpm"               # samplers.SAMPLERS
    steps: Optional[int] = None         # ddim: default min(100, T); dpm++2m: default min(20, T-1); ddpm runs all T
    eta: Optional[float] = None         # DDIM noise (default 0)
    spacing: Optional[str] = None       # --schedule: dpm++2m's grid, samplers.SPACINGS (default: default_spacing)
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N (a GPU rank uses cuda:LOCAL_RANK)
    backend: str = "fast"               # samplers.SAMPLE_BACKENDS
    step_backend: Optional[str] = None  # fast backend: ops.ddpm_step / ddim_step's backend (default auto)
    amp: bool = True                    # fast backend: bf16 autocast on CUDA
    cuda_graph: bool = True             # fast backend: CUDA-graph replay on CUDA
    channels_last: bool = False
    patch_model: bool = False           # fast backend: cbdm_fast.nn's fused modules
    compile: bool = False               # fast backend: the UNet under torch.compile
    shard_size: Optional[int] = None    # default: a multiple of batch_size near 2048
    keep_shards: bool = False
    progress: bool = True               # a progress bar on stderr (rank 0)
    out: Optional[str] = None           # the .npz (default beside ckpt, named by method, omega and count)
    grid: Optional[str] = None          # the PNG grid (default: out with .png)
