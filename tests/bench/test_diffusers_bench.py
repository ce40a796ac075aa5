"""`python -m cbdm_fast.bench.diffusers_bench`: the fused ops inside HF diffusers' UNet2DModel."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_diffusers_bench_times_the_client_unet_patched_and_not(tmp_path):
    """#16 point 5 as a CPU smoke run: the four providers time one forward+backward each, the patched rows
    carry the report's fused counts and their ratio against the unpatched model."""
    pytest.importorskip("diffusers")
    from cbdm_fast.bench import diffusers_bench
    js = tmp_path / "d.json"
    assert diffusers_bench.main(["--device", "cpu", "--small", "--batch-size", "2", "--providers", "eager,patched",
                                 "--warmup", "0", "--iters", "1", "--json", str(js)]) == 0
    eager, patched = json.loads(js.read_text())
    assert (eager["provider"], patched["provider"]) == ("eager", "patched")
    assert eager["fused_pairs"] is None and patched["fused_pairs"] > 0 and patched["fused_adds"] > 0
    assert patched["speedup_vs_unpatched"] == pytest.approx(eager["median_ms"] / patched["median_ms"])
