"""Fixtures the op tests share."""
import pytest

from cbdm_fast.ops import _extension


@pytest.fixture
def ext(monkeypatch):
    """The built C++/CUDA extension module (CBDM_FAST_NO_EXT cleared); the test is skipped, naming why,
    where it is not built (tests/test_build.py fails for that)."""
    monkeypatch.delenv("CBDM_FAST_NO_EXT", raising=False)
    mod = _extension.load()
    if mod is None:
        pytest.skip(f"extension not built: {_extension.unavailable_reason()} (tests/test_build.py fails for this)")
    return mod
