"""`python -m cbdm_fast.bench ceiling`: the recorded layer calls are the UNet's matrix work (their FLOPs
equal torch's own count of the convolutions and linear layers, forward and backward), the CLI writes
its records (its bad flags: test_bench_entry_point.py)."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cbdm_fast.bench.__main__ import main
from cbdm_fast.bench.ceiling import _Replay, call_flops, record_calls
from cbdm_fast.bench.workload import model_config
from cbdm_fast.model import UNet

MATRIX_OPS = ("convolution", "convolution_backward", "addmm", "mm")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = UNet(**model_config("small", 10))
    x = torch.randn(4, 3, 16, 16)
    t, y = torch.randint(100, (4,)), torch.randint(10, (4,))
    return model, x, t, y


def matrix_flops(counter: FlopCounterMode) -> int:
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in MATRIX_OPS)


def test_recorded_calls_are_every_conv_and_linear_of_the_forward(small):
    model, x, t, y = small
    calls = record_calls(model, x, t, y)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert {id(c.module) for c in calls} == {id(m) for m in layers}
    assert len(calls) >= len(layers)
    # the image and the (frozen) sinusoidal time embedding need no gradient; every other input does
    no_grad = [c.module for c in calls if not c.needs_input_grad]
    assert no_grad == [model.time_embedding.timembedding[1], model.head]
    assert all(c.input_shape[0] == 4 for c in calls if isinstance(c.module, torch.nn.Conv2d))


def test_counted_flops_equal_torchs_count_of_the_matrix_ops(small):
    model, x, t, y = small
    calls = record_calls(model, x, t, y)
    with FlopCounterMode(display=False) as fwd:
        out = model(x, t, y=y)
    assert sum(call_flops(c, backward=False) for c in calls) == matrix_flops(fwd)
    with FlopCounterMode(display=False) as both:
        model(x, t, y=y).square().mean().backward()
    assert sum(call_flops(c, backward=True) for c in calls) == matrix_flops(both)
    del out


@pytest.mark.parametrize("backward", [False, True])
def test_a_replay_pass_runs_every_layer_in_bf16(small, backward):
    model, x, t, y = small
    calls = record_calls(model, x, t, y)
    replay = _Replay(calls, torch.bfloat16, torch.device("cpu"), channels_last=True, backward=backward, seed=0)
    assert len(replay.items) == len(calls)
    assert all(item[1].dtype == torch.bfloat16 and item[2].dtype == torch.bfloat16 for item in replay.items)
    with FlopCounterMode(display=False) as counter:
        replay.run()
    assert matrix_flops(counter) == sum(call_flops(c, backward) for c in calls)


def test_ceiling_cli_writes_one_record_per_work_and_dtype(tmp_path, capsys):
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    assert main(["ceiling", "--model", "small", "--batch-size", "2", "--warmup", "0", "--iters", "1",
                 "--json", str(js), "--markdown", str(md)]) == 0
    records = json.loads(js.read_text())
    assert [(r["work"], r["dtype"]) for r in records] == [("train", "fp32"), ("train", "bf16"),
                                                          ("sample", "fp32"), ("sample", "bf16")]
    for r in records:
        assert r["floor_ms"] > 0 and r["reference_ms"] > 0 and r["batch_size"] == 2
        assert r["max_ratio"] == pytest.approx(r["reference_ms"] / r["floor_ms"])
        assert r["matrix_tflops"] == pytest.approx(r["matrix_flops"] / (r["floor_ms"] * 1e-3) / 1e12)
    train, sample = records[0], records[2]
    assert train["matrix_flops"] > 2 * sample["matrix_flops"]  # the backward's two GEMMs per layer
    assert "| work | dtype | matrix floor ms |" in md.read_text()
    assert "bound on speed-up" in capsys.readouterr().out


@pytest.mark.gpu
def test_ceiling_on_the_gpu_replays_a_cuda_graph(tmp_path):
    js = tmp_path / "c.json"
    assert main(["ceiling", "--device", "cuda", "--model", "small", "--batch-size", "4", "--warmup", "1",
                 "--iters", "3", "--channels-last", "--json", str(js)]) == 0
    records = json.loads(js.read_text())
    assert len(records) == 4 and all(r["device"] == "cuda" and r["floor_ms"] > 0 for r in records)
    bf16 = {r["work"]: r for r in records if r["dtype"] == "bf16"}
    assert bf16["train"]["floor_ms"] > bf16["sample"]["floor_ms"]
