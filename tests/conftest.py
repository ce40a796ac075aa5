"""Shared fixtures: a reproducible seed for every test, the golden fixture of the authors' code,
and the `gpu` marker (skipped when torch.cuda.is_available() is False)."""
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, so a plain
# `pytest` tests them too. This must happen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared/fixtures relative to the repository root; CBDM_FIXTURES overrides (a file or its folder).
FIXTURE_NAME = "reference_cbdm_small.pt"
DEFAULT_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / FIXTURE_NAME


def fixture_path() -> Path:
    env = os.environ.get("CBDM_FIXTURES")
    if not env:
        return DEFAULT_FIXTURE
    p = Path(env)
    return p / FIXTURE_NAME if p.is_dir() else p


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixture():
    path = fixture_path()
    if not path.exists():
        # a failure, not a skip: without the fixture nothing proves the reference path is faithful
        pytest.fail(f"golden fixture not found at {path}: the faithfulness tests need the shared "
                    f"fixtures beside the repository (or set CBDM_FIXTURES)", pytrace=False)
    return torch.load(path, weights_only=False, map_location="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and stall badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
