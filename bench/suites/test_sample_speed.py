"""pytest-benchmark suite: one guided sampling step per backend at the small size (CPU or CUDA).

Run with ``pytest bench/suites --benchmark-only`` (not collected by a plain ``pytest``: testpaths is tests/).
The side-by-side runner with JSON output is ``python -m cbdm_fast.bench sample``; this suite is the
quick regression check of the same steps (cbdm_fast.bench.sample.make_step).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from cbdm_fast.bench.sample import SampleBenchConfig, make_step  # noqa: E402
from cbdm_fast.bench.workload import model_config  # noqa: E402
from cbdm_fast.model import UNet  # noqa: E402
from cbdm_fast.schedule import Schedule  # noqa: E402

B, SIZE, NC = 8, 16, 10
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "fast"] + (["fast_graph"] if DEVICE == "cuda" else ["fast_bf16"])


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = UNet(**model_config("small", NC)).eval()
    y = torch.arange(B).remainder(NC).to(DEVICE)
    return base, Schedule(1000, device=DEVICE), y


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_step(benchmark, setup, backend):
    base, schedule, y = setup
    cfg = SampleBenchConfig(device=DEVICE, batch_size=B, model="small").resolved()
    step = make_step(backend, base, schedule, y, (3, SIZE, SIZE), cfg)

    def run():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"guided sampling step, small UNet {SIZE}x{SIZE}, batch {B}, {DEVICE}"
    benchmark.extra_info.update(backend=backend, batch_size=B, image_size=SIZE, device=DEVICE)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=2)
