"""`python -m cbdm_fast.bench.gn_sweep`: the GroupNorm+SiLU launch configurations, timed and checked
against torch."""
import json

import pytest

from cli_helpers import usage_error

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_gn_sweep_times_each_variant_and_checks_it_against_torch(tmp_path):
    """The GroupNorm+SiLU launch sweep (#14), as a CPU smoke run through the Triton interpreter: every
    variant runs, matches torch, and the summary picks the fastest of ours per shape."""
    from cbdm_fast.bench import gn_sweep
    from cbdm_fast.kernels._common import INTERPRETED
    if not INTERPRETED:
        pytest.skip("needs the Triton interpreter on the CPU (TRITON_INTERPRET=1)")
    js, md = tmp_path / "gs.json", tmp_path / "gs.md"
    assert gn_sweep.main(["--device", "cpu", "--small", "--no-compiled", "--warmup", "0", "--reps", "1",
                          "--variants", "groups,rows_t2k", "--json", str(js), "--markdown", str(md)]) == 0
    records = json.loads(js.read_text())
    assert {(r["provider"], r["mode"]) for r in records} == {(p, m) for p in ("torch", "groups", "rows_t2k")
                                                             for m in ("fwd", "full")}
    assert all(r["error"] is None and r["median_ms"] > 0 for r in records)
    assert all(r["max_rel_diff_vs_torch"] < 1e-5 for r in records)  # fp32 on the CPU
    summary = gn_sweep.summarise(records)
    assert [s["shape"] for s in summary] == ["2x64x4x4", "3x32x5x5"]
    assert all(s["best"] in ("groups", "rows_t2k") for s in summary)
    assert "best of ours" in md.read_text()
    # the sweep leaves the kernels' launch settings as it found them
    assert gn_sweep._modules()["gns"].STRATEGY == "groups"


def test_gn_sweep_names_an_unknown_variant(capsys, tmp_path):
    from cbdm_fast.bench import gn_sweep
    out = tmp_path / "x.json"
    err = usage_error(gn_sweep.main, ["--device", "cpu", "--variants", "rows_t3k", "--json", str(out)], capsys)
    assert "--variants: unknown variant(s) rows_t3k" in err and not out.exists()
