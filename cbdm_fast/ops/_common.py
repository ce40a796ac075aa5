"""What every op shares, written once: environment flags, backend choice, Triton availability, argument
checks (TypeError / ValueError naming the argument) and the layouts the kernels take.

Environment flags, read at each call so that a process (or a test) can flip them:
  CBDM_FAST_NO_EXT=1   disables the C++/CUDA extension cbdm_fast._C; the ops use their torch reference.
  CBDM_FAST_CHECKS=1   also runs the value checks that read CUDA tensors (a host sync each), never while
                       a CUDA graph is being captured.
  TRITON_INTERPRET=1   read by triton itself when the kernels are first imported: they are then built
                       for the interpreter and run on CPU tensors (see triton_mode()).
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import warnings
from types import ModuleType
from typing import Literal, Optional, Sequence, Tuple, get_args

import torch

TritonBackend = Literal["auto", "triton", "reference"]        # the ops with Triton kernels
ExtensionBackend = Literal["auto", "extension", "reference"]  # the ops in the C++/CUDA extension
TRITON_BACKENDS: tuple[str, ...] = get_args(TritonBackend)
EXTENSION_BACKENDS: tuple[str, ...] = get_args(ExtensionBackend)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Blocker = Optional[Tuple[type, str]]  # None, or (exception type, message): why a fast backend cannot run

# ----------------------------------------------------------------------------- environment flags


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` holds 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def extension_disabled() -> bool:
    return env_flag("CBDM_FAST_NO_EXT")


def checks_enabled() -> bool:
    return env_flag("CBDM_FAST_CHECKS")


def value_checks_run(x: torch.Tensor) -> bool:
    """Whether checks that read x's values run: always for CPU tensors, for other devices only with
    CBDM_FAST_CHECKS=1 (a host sync) and never inside a CUDA-graph capture (a sync is illegal there);
    never while torch.compile traces (a data-dependent branch is a graph break) nor on meta tensors."""
    if torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "meta" or not checks_enabled():
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------- backends and Triton

_triton_mode: Optional[str] = None
_triton_error: Optional[BaseException] = None
_warned_no_triton = False


@torch.compiler.assume_constant_result
def triton_mode() -> str:
    """'interpreted' (the kernels run on CPU tensors), 'compiled' (on CUDA tensors) or 'none' (triton
    missing or failing to import). Decided at the first call; a constant for torch.compile."""
    global _triton_mode, _triton_error
    if _triton_mode is None:
        try:
            interpreted = kernel_module("_common").INTERPRETED
            _triton_mode = "interpreted" if interpreted else "compiled"
        except Exception as e:  # ImportError (no triton), or triton failing to initialise
            _triton_mode, _triton_error = "none", e
    return _triton_mode


def kernel_module(name: str) -> ModuleType:
    """cbdm_fast.kernels.<name>, imported on first use: importing triton costs time, may fail, and
    decides once whether the kernels are interpreted."""
    return importlib.import_module(f"cbdm_fast.kernels.{name}")


def triton_blocker(op: str, x: torch.Tensor, name: str = "x") -> Blocker:
    """None when the Triton kernels can run on x (argument ``name`` of ``op``), else why not."""
    mode = triton_mode()
    if mode == "none":
        return RuntimeError, (f"{op}: backend='triton' but the Triton kernels cannot be imported "
                              f"({type(_triton_error).__name__}: {_triton_error})")
    if x.dtype not in TRITON_DTYPES:
        return TypeError, f"{op}: the Triton kernels take float32, bfloat16 or float16, got {name} of dtype {x.dtype}"
    if x.device.type == "cuda" or (x.device.type == "cpu" and mode == "interpreted"):
        return None
    if x.device.type == "cpu":
        return RuntimeError, (f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set "
                              f"TRITON_INTERPRET=1 before triton is imported")
    return ValueError, f"{op}: the Triton kernels do not support device {x.device}"


def check_backend(op: str, backend, choices: Sequence[str]) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {tuple(choices)}, got {backend!r}")


def fast_path(backend: str, fast: str, blocker: Blocker) -> bool:
    """Whether an op runs its fast backend ``fast`` ("triton" or "extension"): yes when nothing blocks
    it; when something does, the error if the caller named that backend, else False (the reference)."""
    if blocker is None:
        return True
    if backend == fast:
        raise blocker[0](blocker[1])
    return False


def use_triton(op: str, x: torch.Tensor, backend: str, name: str = "x") -> bool:
    """fast_path for the Triton ops (x: their argument ``name``, which decides device and dtype); warns
    once when CUDA tensors fall back because triton is missing."""
    global _warned_no_triton
    if backend == "reference":
        return False
    if fast_path(backend, "triton", triton_blocker(op, x, name)):
        return True
    if x.device.type == "cuda" and triton_mode() == "none" and not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn(f"cbdm_fast: the Triton kernels could not be imported ({type(_triton_error).__name__}: "
                      f"{_triton_error}); using the torch reference ops.", RuntimeWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------- argument checks


def check_tensor(op: str, name: str, v, optional: bool = False) -> None:
    if not (isinstance(v, torch.Tensor) or (optional and v is None)):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(v).__name__}")


def check_device(op: str, name: str, v: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if v.device != ref.device:
        raise ValueError(f"{op}: {name} is on {v.device} but {ref_name} is on {ref.device}; "
                         f"all tensors must be on the same device")


def check_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return int(value)


def check_real(op: str, name: str, value, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, hint: str = "") -> float:
    """value as a float: TypeError unless a real number (a bool is not), ValueError unless finite and
    in [low, high] ((low, high] with low_open; a missing bound is unbounded). hint ends the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    above = low is None or (value > low if low_open else value >= low)
    if math.isfinite(value) and above and (high is None or value <= high):
        return value
    if low is not None and high is not None:
        bounds = f" and in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        bounds = f" and {'>' if low_open else '>='} {low:g}"
    else:
        bounds = "" if high is None else f" and <= {high:g}"
    raise ValueError(f"{op}: {name} must be finite{bounds}{hint}, got {value}")


def check_images(op: str, named, optional: Sequence[str] = ()) -> torch.Tensor:
    """(name, tensor) pairs of one (B, ...) batch, the first the reference: each a tensor (those named
    in ``optional`` may be None), the first floating with a batch dimension, the others with its dtype,
    shape and device. Returns the first."""
    for name, v in named:
        check_tensor(op, name, v, optional=name in optional)
    ref_name, ref = named[0]
    if not ref.is_floating_point():
        raise TypeError(f"{op}: {ref_name} must have a floating dtype, got {ref.dtype}")
    if ref.dim() < 1:
        raise ValueError(f"{op}: {ref_name} must have a batch dimension, got a 0-d tensor")
    for name, v in named[1:]:
        if v is None:
            continue
        if v.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {v.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
        if v.shape != ref.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(v.shape)} but {ref_name} has shape "
                             f"{tuple(ref.shape)}; they must match")
        check_device(op, name, v, ref_name, ref)
    return ref


def check_t(op: str, t, B: int, device: torch.device, name: str = "t") -> None:
    """A (B,) int64 tensor of timesteps on ``device``."""
    check_tensor(op, name, t)
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be an int64 tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{op}: {name} must be 1-D with one timestep per sample (shape ({B},)), "
                         f"got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {device}; "
                         f"all tensors must be on the same device")


def check_t_range(op: str, t: torch.Tensor, T: int) -> None:
    """t in [0, T), where value_checks_run(t)."""
    if t.numel() == 0 or not value_checks_run(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= T:
        raise ValueError(f"{op}: t must be in [0, T) = [0, {T}), got a timestep {lo if lo < 0 else hi}")


# ----------------------------------------------------------------------------- layouts


def batch_outer_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill one dense block of memory with the batch dimension outermost, so
    that sample b is the memory range [b*N, (b+1)*N) from x's first element (N = numel // B).
    Contiguous and channels_last tensors and batch slices of them (out[:B], out[B:]) qualify."""
    if x.dim() == 0:
        return False
    if x.numel() == 0:
        return True
    inner = sorted((x.stride(i), x.size(i)) for i in range(1, x.dim()) if x.size(i) != 1)
    expected = 1
    for stride, size in inner:
        if stride != expected:
            return False
        expected *= size
    return x.size(0) == 1 or x.stride(0) == expected


def channels_last_contiguous(x: torch.Tensor) -> bool:
    """x (N, C, *spatial) is laid out as a contiguous (N, *spatial, C) (size-1 dims ignored, like
    is_contiguous): x.movedim(1, -1).is_contiguous() from the strides alone (no view: it runs several
    times per call of group_norm_silu)."""
    shape, strides = x.shape, x.stride()
    expected = 1
    for i in [1] + list(range(x.dim() - 1, 1, -1)) + [0]:
        if shape[i] != 1 and strides[i] != expected:
            return False
        expected *= shape[i]
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1 (same memory order)."""
    return a.shape == b.shape and all(a.stride(i) == b.stride(i) for i in range(a.dim()) if a.size(i) != 1)


def dense_batch_outer(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is batch-outer dense, else a contiguous copy (differentiable)."""
    return x if batch_outer_dense(x) else x.contiguous()


def match_layout(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x in ref's memory layout (ref must be batch-outer dense): x itself when it already is, else a
    differentiable copy."""
    if same_layout(x, ref):
        return x
    if ref.is_contiguous():
        return x.contiguous()
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def combine_guided(eps_c: torch.Tensor, eps_u: Optional[torch.Tensor], omega) -> torch.Tensor:
    """Classifier-free guidance on the noise prediction, in float32 (SPEC: the sampling step):
    eps = eps_c + omega * (eps_c - eps_u), or eps_c alone when there is no unconditional prediction.
    Written in this order so the torch references equal the C++/CUDA steps bit for bit."""
    e_c = eps_c.float()
    return e_c + omega * (e_c - eps_u.float()) if eps_u is not None else e_c


def clipped(x0: torch.Tensor, clip_x0: bool) -> torch.Tensor:
    """The predicted x_0 clamped to the data range [-1, 1] when clip_x0 (NaN stays NaN, as in the C++/CUDA
    steps' clip_x0)."""
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0
