"""The per-op benchmark (bench/ops/: the setups and run.py; the `ops` subcommand of bench/ops_cli.py):
record fields and arithmetic, that the fused and torch providers of every setup compute the same thing
(so the benchmark compares like with like), errors as records, JSON/markdown output
(bad flags: test_bench_entry_point.py).
Tiny sizes on the CPU; the Triton kernels run through the interpreter (tests/conftest.py)."""
import json
import os

import pytest
import torch

from cbdm_fast.bench.__main__ import main as _main
from cbdm_fast.bench.ops import OPS, build_cases
from cbdm_fast.bench.ops.case import SHAPES
from cbdm_fast.bench.ops.run import (OpsBenchConfig, diff_vs, format_markdown, max_rel_diff, mode_fn,
                                     reference_outputs, run_ops_bench)

REQUIRED = {"op", "shape", "dtype", "layout", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "gb_per_s",
            "pct_copy_bw", "peak_mem_bytes", "speedup_vs_torch", "device", "device_name", "torch_version",
            "triton_version", "git_commit", "timestamp", "bytes", "copy_gb_per_s", "max_rel_diff_vs_torch"}
FAST = ["--device", "cpu", "--reps", "2", "--warmup", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


# these tests use CPU tensors: the Triton kernels run on them only through the interpreter
needs_fused = pytest.mark.skipif(not _interpreting(), reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------------------- CLI


@needs_fused
def test_cli_writes_records_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "out" / "ops.json", tmp_path / "ops.md"
    assert _main(["ops"] + FAST + ["--ops", "q_sample,ddpm_step", "--providers", "torch,fused",
                                   "--json", str(js), "--markdown", str(md)]) == 0
    records = json.loads(js.read_text())
    keys = [(r["op"], r["shape"], r["provider"], r["mode"]) for r in records]
    assert keys == [("q_sample", "4x3x8x8", p, m) for p in ("torch", "fused") for m in ("fwd", "bwd", "full")] + \
                   [("ddpm_step", s, p, "fwd") for s in ("4x3x8x8", "8x3x8x8") for p in ("torch", "fused")]
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert "error" not in r, r["error"]
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["size"] == "small"
        assert r["layout"] == ("contiguous" if r["op"] == "ddpm_step" else "channels_last")
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and len(r["times_ms"]) == 2
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gb_per_s"] / r["copy_gb_per_s"])
        assert r["copy_gb_per_s"] > 0
        assert r["peak_mem_bytes"] is None and r["peak_mem_delta_bytes"] is None  # CPU
        assert r["torch_version"] == torch.__version__
        torch_row = next(t for t in records if t["provider"] == "torch" and
                         (t["op"], t["shape"], t["mode"]) == (r["op"], r["shape"], r["mode"]))
        assert r["speedup_vs_torch"] == pytest.approx(torch_row["median_ms"] / r["median_ms"])
        if r["provider"] == "torch":
            assert r["speedup_vs_torch"] == 1.0 and r["max_rel_diff_vs_torch"] is None
        else:
            assert r["max_rel_diff_vs_torch"] < 1e-5  # fp32: the fused ops agree with the reference
    n = 4 * 3 * 8 * 8 * 4
    q = {r["mode"]: r["bytes"] for r in records if r["op"] == "q_sample"}
    assert q == {"fwd": 3 * n + 32, "bwd": 3 * n + 32, "full": 6 * n + 64}
    text = md.read_text()
    assert text.strip() in capsys.readouterr().out  # the same tables on stdout
    assert "### q_sample 4x3x8x8 fp32 channels_last" in text and "### ddpm_step 8x3x8x8 fp32 contiguous" in text
    assert "| mode | provider | median ms | p20/p80 ms | GB/s | % copy BW |" in text
    q_rows = text.split("### q_sample")[1].split("###")[0].splitlines()
    rows = [line.split(" | ")[:2] for line in q_rows if line.startswith("| ") and "---" not in line][1:]
    assert rows == [["| fwd", "torch"], ["| fwd", "fused"], ["| bwd", "torch"], ["| bwd", "fused"],
                    ["| full", "torch"], ["| full", "fused"]]
    assert "device copy bandwidth" in text and "commit" in text


def test_config_defaults_by_device():
    cpu = OpsBenchConfig(device="cpu").resolved()
    assert (cpu.size, cpu.dtype, cpu.warmup, cpu.reps) == ("small", "fp32", 1, 5)
    cuda = OpsBenchConfig(device="cuda").resolved()
    assert (cuda.size, cuda.dtype, cuda.warmup, cuda.reps) == ("train", "bf16", 10, 100)
    with pytest.raises(ValueError, match="providers: unknown"):
        OpsBenchConfig(providers=("torch", "eager")).resolved()
    with pytest.raises(ValueError, match="layout: unknown"):
        OpsBenchConfig(layout="nhwc").resolved()


# ----------------------------------------------------------------------------------------- setups


def test_train_shapes_and_byte_model():
    """The training shapes of the brief, and the counted bytes (built on the meta device: no memory)."""
    assert SHAPES["train"]["norm"] == [(96, 256, 16, 16), (96, 128, 32, 32)]
    assert SHAPES["train"]["attn"] == (96, 256, 16, 16)
    assert SHAPES["train"]["step_batches"] == (64, 256) and SHAPES["train"]["image_batch"] == 128
    (c,) = build_cases("cb_loss", "train", torch.bfloat16, device="meta")
    n = 128 * 3 * 32 * 32
    assert c.shape == (128, 3, 32, 32) and c.modes == ("fwd", "bwd", "full")
    assert c.bytes == {"fwd": 3 * n * 2 + 8 * 128, "bwd": 5 * n * 2 + 8 * 128, "full": 8 * n * 2 + 16 * 128}
    cases = build_cases("group_norm_silu_add", "train", torch.bfloat16, device="meta")
    assert [x.shape for x in cases] == SHAPES["train"]["norm"]
    n, N, C = 96 * 256 * 16 * 16, 96, 256
    assert cases[0].bytes["fwd"] == 2 * n * 2 + 2 * C * 4 + N * C * 2
    assert cases[0].bytes["bwd"] == 3 * n * 2 + 4 * C * 4 + 2 * N * C * 2
    steps = build_cases("ddim_step", "train", torch.bfloat16, device="meta")
    assert [x.shape[0] for x in steps] == [64, 256] and all(x.modes == ("fwd",) for x in steps)
    assert all(x.layout == "contiguous" for x in steps)


def test_max_rel_diff_floors_zero_gradients():
    ref = (torch.tensor([10.0, -2.0]), torch.tensor([1e-9, 0.0]))  # the 2nd is zero in exact arithmetic
    got = (torch.tensor([10.0, -2.01]), torch.tensor([3e-9, 0.0]))
    assert max_rel_diff(got, ref) == pytest.approx(0.001)
    assert max_rel_diff((torch.tensor([1.0, 1.5]),), (torch.tensor([1.0, 2.0]),)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shape"):
        max_rel_diff((torch.zeros(2),), (torch.zeros(3),))


def _assert_same(case, provider, rtol):
    ref = reference_outputs(case, case.make("torch"))
    got = reference_outputs(case, case.make(provider))
    assert len(got["out"]) == len(ref["out"]) and len(got["grad"]) == len(ref["grad"])
    if case.op.endswith("_step"):
        assert not ref["grad"]
    else:
        assert ref["grad"]
    diff = diff_vs(got, ref)
    assert diff <= rtol, f"{case.op} {case.shape_str} {provider}: max rel diff {diff:.2e}"


@needs_fused
@pytest.mark.parametrize("op", OPS)
def test_fused_matches_torch_in_every_setup(op):
    """fp32: the fused provider computes what the torch provider computes (outputs and gradients)."""
    cases = build_cases(op, "small", torch.float32, "channels_last")
    if op.startswith("group_norm") or op == "attn_block":
        cases = cases[:1]  # the interpreted norm kernels cost ~0.3 s a call
    for case in cases:
        assert case.modes == (("fwd",) if op.endswith("_step") else ("fwd", "bwd", "full"))
        _assert_same(case, "fused", 1e-5)


@needs_fused
@pytest.mark.parametrize("op", ["q_sample", "cb_loss"])
def test_fused_matches_torch_bf16_contiguous(op):
    (case,) = build_cases(op, "small", torch.bfloat16, "contiguous")
    _assert_same(case, "fused", 1e-2)


@needs_fused
def test_group_norm_bf16_setup_agrees():
    """The training configuration of the norms: bf16 x, fp32 weight and bias, channels_last."""
    case = build_cases("group_norm_silu_add", "small", torch.bfloat16, "channels_last")[1]
    assert case.layout == "channels_last"
    _assert_same(case, "fused", 5e-2)


def test_compiled_provider_matches_torch():
    """Once, on the smallest op with a backward: torch.compile of the reference (an inductor build)."""
    (case,) = build_cases("q_sample", "small", torch.float32, "contiguous")
    _assert_same(case, "compiled", 1e-6)


def test_mode_fn_times_the_requested_work():
    (case,) = build_cases("q_sample", "small", torch.float32, "contiguous")
    runner = case.make("torch")
    fwd = mode_fn(case, runner, "fwd")()
    assert len(fwd) == 1 and fwd[0].requires_grad  # the training forward records the graph
    bwd = mode_fn(case, runner, "bwd")
    g1, g2 = bwd(), bwd()  # retain_graph: the bwd callable can be timed repeatedly
    assert torch.equal(g1[0], g2[0]) and len(g1) == 2
    assert len(mode_fn(case, runner, "full")()) == 2
    (step,) = build_cases("ddpm_step", "small", torch.float32)[:1]
    with pytest.raises(ValueError, match="no 'bwd' mode"):
        mode_fn(step, step.make("torch"), "bwd")


def test_failing_provider_gives_an_error_record(monkeypatch):
    def broken(fn):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr("cbdm_fast.bench.ops.case.compiled", broken)
    cfg = OpsBenchConfig(device="cpu", ops=("ddim_step",), providers=("torch", "compiled"), modes=("fwd",),
                         reps=1, warmup=0, copy_bytes=2 ** 20)
    records = run_ops_bench(cfg, log=lambda s: None)
    assert [(r["provider"], r["mode"]) for r in records] == [("torch", "fwd"), ("compiled", "fwd")] * 2
    for r in records:
        if r["provider"] == "compiled":
            assert r["error"] == "RuntimeError: no compiler here"
            assert r["median_ms"] is None and r["speedup_vs_torch"] is None
        else:
            assert "error" not in r and r["median_ms"] > 0
    text = format_markdown(records)
    assert "| fwd | compiled | error: RuntimeError: no compiler here |" in text


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_fused_matches_torch_at_training_shapes_on_gpu(op):
    """The GPU configuration of the benchmark (train shapes, bf16, channels_last): fused and compiled
    agree with torch to bf16 accuracy, so the GPU rows compare like with like."""
    tol = 1e-1 if op == "attn_block" else 3e-2
    for case in build_cases(op, "train", torch.bfloat16, "channels_last", "cuda"):
        for provider in ("fused", "compiled"):
            _assert_same(case, provider, tol)


@pytest.mark.gpu
def test_graph_timing_runs_and_is_below_per_call_timing():
    """--timing graph: GPU time per call from CUDA-graph replays; the host's launch time is excluded, so
    it cannot exceed the per-call (eager) time of the same row by more than noise."""
    cfg = dict(device="cuda", ops=("q_sample",), providers=("torch", "fused"), modes=("fwd",), size="train",
               warmup=3, reps=10)
    eager = run_ops_bench(OpsBenchConfig(**cfg), log=lambda s: None)
    graph = run_ops_bench(OpsBenchConfig(timing="graph", **cfg), log=lambda s: None)
    for e, g in zip(eager, graph):
        assert "error" not in g, g.get("error")
        assert g["timing"] == "graph" and 0 < g["median_ms"] <= 1.5 * e["median_ms"]
