"""`python -m cbdm_fast.bench sample` (bench/sample_cli.py + bench/sample.py): JSON and markdown
records at the small size on the CPU (its bad flags: test_bench_entry_point.py)."""
import json

import pytest
import torch

from cbdm_fast.bench.__main__ import main

SMALL = ["sample", "--device", "cpu", "--model", "small", "--image-size", "8", "--steps-timed", "2",
         "--warmup", "1", "--batch-size", "2"]
REQUIRED = {"backend", "device", "device_name", "batch_size", "steps_per_s", "samples_per_s_1000",
            "samples_per_s_ddim100", "ms_per_step", "p20_ms", "p80_ms", "ratio_vs_reference", "peak_mem_bytes",
            "torch_version", "git_commit", "timestamp", "model", "amp", "cuda_graph", "tflops", "mfu",
            "forwards_per_step", "times_ms"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_bench_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "out" / "s.json", tmp_path / "s.md"
    assert main(SMALL + ["--json", str(js), "--markdown", str(md)]) == 0
    records = json.loads(js.read_text())
    assert [r["backend"] for r in records] == ["reference", "fast", "fast_bf16"]
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"] == "cpu" and r["batch_size"] == 2 and r["image_size"] == 8
        assert r["model"]["ch"] == 32 and r["model"]["num_class"] == 10
        assert r["p20_ms"] <= r["ms_per_step"] <= r["p80_ms"] and len(r["times_ms"]) == 2
        assert r["steps_per_s"] == pytest.approx(1000 / r["ms_per_step"])
        assert r["samples_per_s_1000"] == pytest.approx(r["steps_per_s"] * 2 / 1000)
        assert r["samples_per_s_ddim100"] == pytest.approx(r["steps_per_s"] * 2 / 100)
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
        assert r["torch_version"] == torch.__version__ and r["cuda_graph"] is False
        assert r["flops_per_step"] == 2 * r["forward_flops"] > 0 and r["mfu"] is None
    ref, fast, bf16 = records
    assert ref["ratio_vs_reference"] == 1.0 and ref["forwards_per_step"] == 2 and not ref["amp"]
    assert fast["ratio_vs_reference"] == pytest.approx(fast["steps_per_s"] / ref["steps_per_s"])
    assert fast["forwards_per_step"] == 1 and not fast["amp"] and bf16["amp"]
    text = md.read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| backend", "| reference", "| fast", "| fast_bf16"]
    assert "samples/s (1000 steps)" in capsys.readouterr().out


def test_sample_bench_one_backend_ddim_op(tmp_path):
    js = tmp_path / "s.json"
    assert main(SMALL + ["--json", str(js), "--backends", "fast", "--sampler", "ddim", "--peak-tflops", "1"]) == 0
    (r,) = json.loads(js.read_text())
    assert r["ratio_vs_reference"] is None and r["sampler"] == "ddim"
    assert r["mfu"] == pytest.approx(r["tflops"])


def test_sample_bench_rows_per_sampler_in_one_run(tmp_path):
    """--sampler ddpm,dpm++2m: the reference row once, then each fast backend per sampler, each with its
    sampler's samples/s (1000 steps for DDPM, 20 for DPM-Solver++)."""
    js = tmp_path / "s.json"
    assert main(SMALL + ["--json", str(js), "--backends", "reference,fast", "--sampler", "ddpm,dpm++2m"]) == 0
    records = json.loads(js.read_text())
    assert [(r["backend"], r["sampler"], r["sample_steps"]) for r in records] == [
        ("reference", "ddpm", 1000), ("fast", "ddpm", 1000), ("fast", "dpm++2m", 20)]
    for r in records:
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 2 / r["sample_steps"])


@pytest.mark.gpu
def test_sample_bench_cuda_small(tmp_path):
    js = tmp_path / "g.json"
    assert main(["sample", "--device", "cuda", "--model", "small", "--batch-size", "16", "--steps-timed", "5",
                 "--json", str(js)]) == 0
    records = json.loads(js.read_text())
    assert [r["backend"] for r in records] == ["reference", "fast", "fast_graph", "fast_compiled"]
    assert records[2]["cuda_graph"] and records[1]["amp"] and records[0]["peak_mem_bytes"] > 0
    assert records[3]["compiled"] and not records[2]["compiled"]
