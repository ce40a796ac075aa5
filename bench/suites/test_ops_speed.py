"""pytest-benchmark suite: every op setup of cbdm_fast.bench.ops, per provider and mode.

Run with ``pytest bench/suites/test_ops_speed.py --benchmark-only`` (not collected by a plain ``pytest``:
testpaths is tests/). Two suites over the same setups:
- ``test_op_cpu``: the small sizes on the CPU, fp32, providers torch and fused (the Triton kernels need
  TRITON_INTERPRET=1 set before triton's first import on a CPU; without it their rows are skipped);
  the compiled provider is marked slow (``-m slow`` runs it: one inductor compile per setup).
- ``test_op_gpu`` (marked gpu, skipped without CUDA): the training shapes on CUDA, bf16,
  channels_last, all three providers.
pytest-benchmark times wall clock around each call (the CUDA calls end with a synchronize); the
device-event median of the same callable (common.time_fn, L2 flushed before each call) goes into
extra_info["event_median_ms"], with the counted bytes and GB/s. The side-by-side runner with JSON and
markdown output is ``python -m cbdm_fast.bench ops``.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from cbdm_fast.bench.common import L2_FLUSH_BYTES, error_text, time_fn  # noqa: E402
from cbdm_fast.bench.ops import OPS, build_cases  # noqa: E402
from cbdm_fast.bench.ops.case import DTYPE_NAMES, MODES, PROVIDERS, SHAPES  # noqa: E402
from cbdm_fast.bench.ops.run import as_tuple, mode_fn, reference_outputs  # noqa: E402

CUDA = torch.cuda.is_available()
_CASES: dict = {}    # the setups of one op at a time
_RUNNERS: dict = {}  # (op, k, provider) -> (Runner, error): one torch.compile per setup, not per mode


def _case(op: str, k: int, size: str, device: str, dtype: torch.dtype):
    key = (op, size, device, dtype)
    if key not in _CASES:
        _CASES.clear()
        _RUNNERS.clear()
        _CASES[key] = build_cases(op, size, dtype, "channels_last", device)
    return _CASES[key][k]


def _runner(case, k: int, provider: str):
    key = (case.op, k, provider)
    if key not in _RUNNERS:
        try:
            runner = case.make(provider)
            reference_outputs(case, runner)  # first call: compiles, and surfaces an unavailable backend
            _RUNNERS[key] = (runner, None)
        except (RuntimeError, TypeError, ValueError) as e:
            if provider == "torch":
                raise
            _RUNNERS[key] = (None, error_text(e))
    return _RUNNERS[key]


def _params(size: str, providers, slow_compiled: bool):
    out = []
    for op in OPS:
        n_shapes = len(SHAPES[size]["step_batches"] if op.endswith("_step") else
                       SHAPES[size]["norm"] if op.startswith("group_norm") else [None])
        modes = ("fwd",) if op.endswith("_step") else MODES
        for k in range(n_shapes):
            for provider in providers:
                for mode in modes:
                    marks = [pytest.mark.slow] if (slow_compiled and provider == "compiled") else []
                    out.append(pytest.param(op, k, provider, mode, marks=marks, id=f"{op}-{k}-{provider}-{mode}"))
    return out


def _bench(benchmark, op, k, provider, mode, size, device, dtype, rounds, warmup):
    case = _case(op, k, size, device, dtype)
    runner, error = _runner(case, k, provider)
    if error is not None:
        pytest.skip(f"{provider} cannot run here: {error}")
    fn = mode_fn(case, runner, mode)
    dev = torch.device(device)
    if dev.type == "cuda":
        res = time_fn(fn, dev, warmup, 50, torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=dev))
        med = float(np.median(res["times_ms"]))
        benchmark.extra_info.update(event_median_ms=med, gb_per_s=case.bytes[mode] / (med * 1e-3) / 1e9,
                                    peak_mem_bytes=res["peak_mem_bytes"])

        def run():
            out = fn()
            torch.cuda.synchronize(dev)
            return out
    else:
        run = fn
    benchmark.group = f"{op} {case.shape_str} {DTYPE_NAMES[dtype]} {case.layout} {mode}, {device}"
    benchmark.extra_info.update(op=op, shape=case.shape_str, provider=provider, mode=mode, device=device,
                                bytes=case.bytes[mode])
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert all(torch.isfinite(o).all() for o in as_tuple(out))


@pytest.mark.parametrize("op,k,provider,mode", _params("small", PROVIDERS, slow_compiled=True))
def test_op_cpu(benchmark, op, k, provider, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _bench(benchmark, op, k, provider, mode, "small", "cpu", torch.float32, rounds=3, warmup=1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("op,k,provider,mode", _params("train", PROVIDERS, slow_compiled=False))
def test_op_gpu(benchmark, op, k, provider, mode):
    _bench(benchmark, op, k, provider, mode, "train", "cuda", torch.bfloat16, rounds=50, warmup=10)
