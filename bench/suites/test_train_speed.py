"""pytest-benchmark suite: one CBDM training step per backend at the small size (CPU or CUDA).

Run with ``pytest bench/suites --benchmark-only`` (not collected by a plain ``pytest``: testpaths is tests/).
The side-by-side runner with JSON output is ``python -m cbdm_fast.bench train``; this suite is the
quick regression check of the same steps (cbdm_fast.bench.train.make_step).
"""
import contextlib

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from cbdm_fast.bench.train import BACKENDS, OneProcessGroup, make_step  # noqa: E402
from cbdm_fast.bench.workload import long_tail_probs, model_config, synthetic_batches  # noqa: E402
from cbdm_fast.model import UNet  # noqa: E402

B, SIZE, NC = 8, 16, 10
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = UNet(**model_config("small", NC))
    probs = long_tail_probs(NC)
    return base, synthetic_batches(4, B, SIZE, probs, DEVICE, 1), probs


def _sync_step(step):
    if DEVICE == "cuda":
        def run():
            out = step()
            torch.cuda.synchronize()
            return out
        return run
    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, setup, backend):
    if backend.startswith("compiled") and DEVICE == "cpu":
        pytest.skip("compiled backends are benchmarked on CUDA (inductor compiles for minutes on a small CPU); "
                    "python -m cbdm_fast.bench train --backends compiled_bf16 times them on CPU")
    base, batches, probs = setup
    # the _ddp backends wrap the model in DDP, which needs a process group: one of one rank, as bench train makes
    group = OneProcessGroup(torch.device(DEVICE)) if backend.endswith("_ddp") else contextlib.nullcontext()
    with group:
        step = _sync_step(make_step(backend, base, batches, probs, DEVICE, channels_last=False))
        benchmark.group = f"cbdm train step, small UNet {SIZE}x{SIZE}, batch {B}, {DEVICE}"
        benchmark.extra_info.update(backend=backend, batch_size=B, image_size=SIZE, device=DEVICE)
        out = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=4)  # compiled: capture in warm-up
    assert torch.isfinite(out["loss"])
