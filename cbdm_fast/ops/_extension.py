"""Lazy access to the compiled extension ``cbdm_fast._C``.

``load()`` returns the module, or None when it is disabled (env ``CBDM_FAST_NO_EXT=1``, read on every
call so tests can flip it) or cannot be imported; an import failure is warned about ONCE, naming
the error, and every op then falls back to its pure-torch reference. ``blocker()`` says whether the
extension can run an op on given inputs and ``launch()`` runs it: pointers, shapes and scalars, and on
CUDA the current stream (so a launch is captured by an enclosing CUDA graph).
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch

from ._common import Blocker, extension_disabled

_UNSET = object()
_module: object = _UNSET          # the imported module, or None after a failed import
_import_error: Optional[BaseException] = None
_cuda_error: Optional[str] = None  # cached result of _C.cuda_runtime_error()


def _import() -> Optional[ModuleType]:
    global _module, _import_error
    if _module is _UNSET:
        try:
            _module = importlib.import_module("cbdm_fast._C")
        except Exception as e:  # ImportError, or an OSError from a missing shared library
            _module, _import_error = None, e
            warnings.warn(
                f"cbdm_fast: the compiled extension cbdm_fast._C could not be imported "
                f"({type(e).__name__}: {e}); falling back to the pure-torch ops. "
                f"Rebuild it with `pip install -e .` (or set CBDM_FAST_NO_EXT=1 to silence this).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module  # type: ignore[return-value]


def load() -> Optional[ModuleType]:
    """The extension module, or None when disabled or not importable."""
    if extension_disabled():
        return None
    return _import()


def available() -> bool:
    """True when the extension is enabled and imported."""
    return load() is not None


def unavailable_reason() -> str:
    """Why ``load()`` returns None ('' when it does not)."""
    if extension_disabled():
        return "disabled by the environment variable CBDM_FAST_NO_EXT=1"
    if _import() is None:
        return f"cbdm_fast._C failed to import: {type(_import_error).__name__}: {_import_error}"
    return ""


def cuda_error() -> str:
    """'' when the extension can launch CUDA kernels here, else why not (not compiled with CUDA, driver
    too old for the CUDA it was compiled with, no device). Queried once and cached."""
    global _cuda_error
    mod = load()
    if mod is None:
        return unavailable_reason()
    if _cuda_error is None:
        if not mod.has_cuda():
            _cuda_error = "cbdm_fast._C was built without CUDA (no nvcc at build time, or CBDM_FAST_CUDA=0)"
        else:
            _cuda_error = mod.cuda_runtime_error()
    return _cuda_error


def cuda_available() -> bool:
    """True when the extension can run its CUDA kernels on this machine."""
    return cuda_error() == ""


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the C++ DType enum


@torch.compiler.assume_constant_result
def _runtime_blocker(op: str, device_type: str) -> str:
    """'' when the loaded extension has ``op`` and can launch it on device_type here, else why not.
    A constant for torch.compile (the answer only changes with the environment)."""
    mod = load()
    if mod is None:
        return f"{op}: backend='extension' but {unavailable_reason()}"
    if not hasattr(mod, f"{op}_cpu"):  # a stale build may predate the op
        return f"{op}: cbdm_fast._C is out of date (no {op}); rebuild it with `pip install -e .`"
    if device_type == "cuda" and not cuda_available():
        return f"{op}: the extension cannot run on CUDA here: {cuda_error()}"
    return ""


def blocker(op: str, x_t: torch.Tensor, named_inputs) -> Blocker:
    """None when the extension can run ``op`` on these inputs, else (exception type, message).

    named_inputs: (name, tensor or None) pairs that must be contiguous and need no autograd.
    """
    runtime = _runtime_blocker(op, x_t.device.type)
    if runtime:
        return RuntimeError, runtime
    dev = x_t.device.type
    if dev == "cpu":
        if x_t.dtype != torch.float32:
            return TypeError, f"{op}: the extension's CPU path needs float32 inputs, got x_t of dtype {x_t.dtype}"
    elif dev == "cuda":
        if x_t.dtype not in _DTYPE_CODE:
            return TypeError, (f"{op}: the extension's CUDA path needs float32, float16 or bfloat16 inputs, "
                               f"got x_t of dtype {x_t.dtype}")
    else:
        return ValueError, f"{op}: the extension does not support device {x_t.device}"
    for name, v in named_inputs:
        if v is not None and not v.is_contiguous():
            return ValueError, (f"{op}: {name} is not contiguous (strides {v.stride()}); the extension needs "
                                f"contiguous inputs: call .contiguous() or use backend='reference'")
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for _, v in named_inputs):
        return ValueError, (f"{op}: the extension does not support autograd; run under torch.no_grad() "
                            "or use backend='reference'")
    return None


def launch(op: str, x_t: torch.Tensor, pointers, scalars) -> None:
    """Runs ``{op}_cpu`` or ``{op}_cuda`` of the extension on x_t's device: the data pointers, the
    scalars, then x_t's dtype code and, on CUDA, the device index and the current stream."""
    mod = load()
    if x_t.device.type == "cpu":
        getattr(mod, f"{op}_cpu")(*pointers, *scalars, _DTYPE_CODE[x_t.dtype])
        return
    device = x_t.device.index if x_t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    getattr(mod, f"{op}_cuda")(*pointers, *scalars, _DTYPE_CODE[x_t.dtype], device, stream)
