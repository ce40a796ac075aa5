"""`python -m cbdm_fast.bench train`: the JSON/markdown outputs at a tiny size (its bad flags:
test_bench_entry_point.py)."""
import json

import pytest
import torch

from cbdm_fast.bench.__main__ import main

SMALL = ["train", "--device", "cpu", "--model", "small", "--iters", "2", "--warmup", "1", "--batch-size", "4"]
REQUIRED = {"backend", "device", "device_name", "batch_size", "img_per_s", "peak_mem_bytes", "median_ms",
            "p20_ms", "p80_ms", "ratio_vs_eager", "tflops", "mfu", "model", "torch_version", "git_commit",
            "timestamp", "channels_last", "flops_per_step", "power_w", "gpu_util_pct"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_bench_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "out" / "b.json", tmp_path / "b.md"
    assert main(SMALL + ["--json", str(js), "--markdown", str(md)]) == 0
    records = json.loads(js.read_text())
    assert isinstance(records, list) and [r["backend"] for r in records] == ["eager", "fused", "fused_bf16"]
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"] == "cpu" and r["batch_size"] == 4 and r["image_size"] == 16
        assert r["model"]["ch"] == 32 and r["model"]["ch_mult"] == [1, 2] and r["model"]["num_class"] == 10
        assert r["img_per_s"] > 0 and r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["img_per_s"] == pytest.approx(4 / (r["median_ms"] * 1e-3))
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
        assert r["tflops"] > 0 and r["mfu"] is None  # no --peak-tflops on CPU
        assert r["power_w"] is None and r["gpu_util_pct"] is None
        assert r["flops_per_step"] == 6 * r["forward_flops"] > 0
        assert len(r["times_ms"]) == 2 and r["torch_version"] == torch.__version__
    eager = records[0]
    assert eager["ratio_vs_eager"] == 1.0 and eager["channels_last"] is False
    for r in records[1:]:
        assert r["ratio_vs_eager"] == pytest.approx(r["img_per_s"] / eager["img_per_s"])
        assert set(r["layout_medians_ms"]) == {"contiguous", "channels_last"}  # auto: both layouts timed
    assert records[2]["amp"] is True and records[1]["amp"] is False
    text = md.read_text()
    assert "| backend | img/s | vs eager |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| backend", "| eager", "| fused", "| fused_bf16"]
    out = capsys.readouterr().out
    assert "fused_bf16" in out and "img/s" in out


def test_train_bench_peak_tflops_gives_mfu(tmp_path):
    js = tmp_path / "b.json"
    assert main(SMALL + ["--json", str(js), "--backends", "fused", "--channels-last", "off",
                         "--peak-tflops", "2"]) == 0
    (r,) = json.loads(js.read_text())
    assert r["ratio_vs_eager"] is None  # no eager in this run
    assert r["mfu"] == pytest.approx(r["tflops"] / 2) and r["channels_last"] is False


def test_train_bench_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """--compile-mode is passed to torch.compile and recorded (the compiled run itself is stubbed: compiling
    on a CPU takes minutes; the compiled backend's numerics are tested in tests/training/test_fast_step.py)."""
    import cbdm_fast.training.fast_step as fs
    seen = []

    def fake_compile(model, **kw):
        seen.append(kw)
        return model
    monkeypatch.setattr(fs.torch, "compile", fake_compile)
    js = tmp_path / "b.json"
    assert main(SMALL + ["--json", str(js), "--backends", "compiled", "--channels-last", "off",
                         "--compile-mode", "max-autotune-no-cudagraphs"]) == 0
    assert seen and all(kw.get("mode") == "max-autotune-no-cudagraphs" for kw in seen)
    assert json.loads(js.read_text())[0]["compile_mode"] == "max-autotune-no-cudagraphs"


def test_train_bench_kernels_list_times_each_fast_backend_once_per_resolved_choice(tmp_path, monkeypatch):
    """--kernels fused,inductor,auto: eager once (torch's kernels, no choice), the fast backend once per
    distinct resolved choice (auto -> inductor on a CPU: the same run as inductor), each record saying which
    kernels ran and why. The steps themselves run on torch's kernels here (our Triton kernels go through the
    interpreter on a CPU, minutes at this size); the fused kernels' step is tested in tests/training/test_step_kernels.py."""
    import cbdm_fast.bench.train as tb
    asked = []
    real_make_step = tb.make_step

    def spy(backend, *args, kernels="auto", **kwargs):
        asked.append((backend, kernels))
        return real_make_step(backend, *args, kernels="inductor", **kwargs)
    monkeypatch.setattr(tb, "make_step", spy)
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(SMALL + ["--json", str(js), "--markdown", str(md), "--backends", "eager,fused",
                         "--channels-last", "off", "--kernels", "fused,inductor,auto"]) == 0
    assert asked == [("eager", "fused"), ("fused", "fused"), ("fused", "inductor")]
    records = json.loads(js.read_text())
    assert [(r["backend"], r["kernels"]) for r in records] == [("eager", None), ("fused", "fused"),
                                                                ("fused", "inductor")]
    assert records[0]["kernels_why"] is None
    assert records[1]["kernels_why"] == records[2]["kernels_why"] == "chosen with --kernels"
    assert all(r["ratio_vs_eager"] == pytest.approx(r["img_per_s"] / records[0]["img_per_s"]) for r in records)
    rows = [line.split(" | ") for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[-1].rstrip(" |") for row in rows] == ["kernels", "-", "fused", "inductor"]
    js_auto = tmp_path / "auto.json"
    assert main(SMALL + ["--json", str(js_auto), "--backends", "fused", "--channels-last", "off"]) == 0
    (auto,) = json.loads(js_auto.read_text())
    assert auto["kernels"] == "inductor" and auto["kernels_why"].startswith("auto -> inductor: ")


def test_train_bench_ddp_backend_runs_the_data_parallel_step_in_a_one_process_group(tmp_path, monkeypatch):
    """fused_ddp times training.FastStep over a DDP-wrapped BatchedLoss (gloo, one rank), records its time
    against fused from the same run, and leaves no process group behind."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from cbdm_fast.training import FastStep
    built = []
    real_init = FastStep.__init__

    def spy(self, *args, **kwargs):
        if kwargs.get("loss") is not None:  # the data-parallel step
            built.append((type(kwargs["loss"]), dist.is_initialized() and dist.get_world_size()))
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(FastStep, "__init__", spy)
    js = tmp_path / "b.json"
    assert main(SMALL + ["--json", str(js), "--backends", "fused,fused_ddp", "--channels-last", "off"]) == 0
    assert built == [(DistributedDataParallel, 1)]
    assert not dist.is_initialized()
    fused, ddp = json.loads(js.read_text())
    assert (fused["ddp"], ddp["ddp"]) == (False, True)
    assert fused["ratio_vs_no_ddp"] is None
    assert ddp["ratio_vs_no_ddp"] == pytest.approx(ddp["img_per_s"] / fused["img_per_s"])
    assert ddp["final_loss"] == ddp["final_loss"] and ddp["final_loss"] > 0  # finite: the DDP step trained
    assert ddp["cuda_graph"] is False


def test_train_bench_ddp_backends_are_opt_in_and_refuse_a_multi_rank_group(tmp_path, monkeypatch):
    from cbdm_fast.bench.train import OneProcessGroup
    import torch.distributed as dist
    js = tmp_path / "b.json"
    assert main(SMALL + ["--json", str(js), "--backends", "auto", "--channels-last", "off"]) == 0
    assert [r["backend"] for r in json.loads(js.read_text())] == ["eager", "fused", "fused_bf16"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="a process group of 2 ranks is initialised"):
        with OneProcessGroup(torch.device("cpu")):
            pass
