"""FastStep (cbdm_fast/training/fast_step.py) and the Trainer's --backend.

Tolerances (fp32, tiny UNet with dropout 0, CPU):
- compiled (aot_eager: the dynamo + AOTAutograd graph, eager kernels) vs fused on the same seed: losses
  and parameters bit-identical over 6 steps (the same kernels in the same order; measured: equal).
- compiled (inductor, slow) vs fused: losses rel 1e-4 per step over 6 steps, parameters max |diff|
  <= 0.05 lr (inductor reorders reductions and fuses; measured rel <= 2e-6).
- GPU, CUDA graph replay vs the same step without a graph, 8 steps: rel 1e-3 per step (fp32, TF32 off).
  The draws are the same, but CUDA backward kernels (atomics in the embedding and weight gradients) are
  not bitwise reproducible run to run, and Adam carries each difference into later steps (measured on
  an H200: 6e-8 at step 2, 1.2e-4 at step 6).
"""
import copy
import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from cbdm_fast.model import UNet
from cbdm_fast.schedule import Schedule
from cbdm_fast.training import FastStep, Trainer, TrainingDiverged, resume_trainer
from cbdm_fast.training.draws import class_cdf, draw_device
from cbdm_fast.training.step import StepConfig, make_optimizer
from train_helpers import tiny_config

T, B, NC, LR = 100, 6, 10, 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet():
    torch.manual_seed(0)
    return UNet(T=T, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, cond=True,
                num_class=NC, in_ch=1)


def batches(n, device="cpu", size=8):
    g = torch.Generator().manual_seed(3)
    return [((torch.rand((B, 1, size, size), generator=g) * 2 - 1).to(device),
             torch.randint(NC, (B,), generator=g).to(device)) for _ in range(n)]


class Stepped:
    """A FastStep whose LR scheduler is stepped after each step, as the Trainer does; otherwise the FastStep."""

    def __init__(self, fast, sched):
        self.fast, self.sched = fast, sched

    def __call__(self, x, y):
        out = self.fast(x, y)
        self.sched.step()
        return out

    def __getattr__(self, name):
        return getattr(self.fast, name)


def make_fast(net, backend, device="cpu", amp=False, **kw):
    model = copy.deepcopy(net).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    capturable = kw.get("cuda_graph", backend == "compiled" and torch.device(device).type == "cuda")
    opt = make_optimizer(model.parameters(), LR, device, capturable=capturable)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s + 1, 3) / 3)
    cfg = StepConfig(method="cbdm", tau=1.0, ema_decay=0.9, amp=amp)
    draw = functools.partial(draw_device, class_cdf=class_cdf(torch.linspace(1.0, 0.1, NC), device), T=T, drop_p=0.3,
                             cb=True)
    return Stepped(FastStep(model, ema, opt, Schedule(T, device=device), cfg, draw, backend=backend, **kw), sched)


def run(stepped, data, seed=5):
    torch.manual_seed(seed)
    return [float(stepped(x, y)["loss"]) for x, y in data]


def test_compiled_aot_eager_matches_fused_bitwise_and_compiles_once():
    net, data = tiny_unet(), batches(6)
    fused = make_fast(net, "fused")
    ref = run(fused, data)
    torch._dynamo.reset()
    counters.clear()
    comp = make_fast(net, "compiled", compile_options={"backend": "aot_eager"})
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(comp, data)
    assert got == ref
    assert all(torch.equal(a, b) for a, b in zip(fused.model.parameters(), comp.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fused.ema.parameters(), comp.ema.parameters()))
    # one graph for the whole model, no graph break, no recompilation across steps with and without the drop
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_inductor_tracks_fused():
    net, data = tiny_unet(), batches(6)
    fused = make_fast(net, "fused")
    ref = run(fused, data)
    torch._dynamo.reset()
    comp = make_fast(net, "compiled")
    got = run(comp, data)
    torch._dynamo.reset()
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, ref)), (got, ref)
    diff = max((a - b).abs().max().item() for a, b in zip(fused.model.parameters(), comp.model.parameters()))
    assert diff <= 0.05 * LR


def test_non_finite_loss_is_recorded_without_a_sync_and_named():
    net, data = tiny_unet(), batches(5)
    fast = make_fast(net, "fused")
    torch.manual_seed(0)
    fast(*data[0])
    fast(*data[1])
    fast.check_finite()  # all finite so far: no error
    with torch.no_grad():
        fast.model.head.weight.fill_(float("nan"))
    fast(*data[2])
    fast(*data[3])
    with pytest.raises(TrainingDiverged, match="at step 3") as info:
        fast.check_finite()
    assert info.value.step == 3


def test_bad_arguments_are_named():
    net = tiny_unet()
    with pytest.raises(ValueError, match="backend"):
        make_fast(net, "graph")
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        make_fast(net, "compiled", cuda_graph=True)


# ------------------------------------------------------------------------------- Trainer
def test_trainer_fused_backend_trains_and_says_so(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, run__backend="fused", run__precision="fp32"), log=lambda s: None)
    assert "step: fused" in trainer.describe() and "fp32" in trainer.describe()
    losses = [trainer.train_step()["loss"] for _ in range(4)]
    assert all(0.05 < v < 10 for v in losses)
    auto = Trainer(tiny_config(tmp_path / "auto", run__backend="auto"), log=lambda s: None)
    assert (auto.backend, auto.amp) == ("fused", True)  # CPU default: fused with bf16 autocast


def test_trainer_fused_backend_resumes_exactly(tmp_path):
    over = dict(run__backend="fused", run__precision="bf16", method__per_sample_drop=False)
    full = Trainer(tiny_config(tmp_path / "a", **over), log=lambda s: None)
    losses_full = [full.train_step() for _ in range(6)]
    part = Trainer(tiny_config(tmp_path / "b", **over), log=lambda s: None)
    losses_part = [part.train_step() for _ in range(2)]
    path = part.save_checkpoint()
    del part
    torch.manual_seed(999)
    resumed = resume_trainer(path, log=lambda s: None)
    assert resumed.backend == "fused" and resumed.step == 2
    losses_part += [resumed.train_step() for _ in range(4)]
    assert losses_part == losses_full
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eager_with_bf16_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--precision bf16 needs --backend fused or compiled"):
        tiny_config(tmp_path, run__backend="eager", run__precision="bf16")


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_replay_matches_the_same_step_without_a_graph(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    net, data = tiny_unet(), batches(8, "cuda")
    plain = make_fast(net, "compiled", "cuda", cuda_graph=False, compile_options={"backend": "aot_eager"})
    ref = run(plain, data)
    torch._dynamo.reset()
    graphed = make_fast(net, "compiled", "cuda", cuda_graph=True, warmup=2,
                        compile_options={"backend": "aot_eager"})
    got = run(graphed, data)
    assert graphed._graph is not None  # steps 3.. were replays
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, ref)), (got, ref)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graph_step_has_no_host_sync_and_detects_nan():
    net, data = tiny_unet(), batches(6, "cuda")
    fast = make_fast(net, "compiled", "cuda", amp=True, warmup=1)
    torch.manual_seed(0)
    fast(*data[0])
    fast(*data[1])  # capture + replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast(*data[2])
        fast(*data[3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fast.check_finite()
    with torch.no_grad():
        fast.model.head.weight.fill_(float("nan"))
    fast(*data[4])
    with pytest.raises(TrainingDiverged, match="at step 5"):
        fast.check_finite()
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("backend,precision", [("fused", "fp32"), ("fused", "bf16")])
def test_demo_model_200_steps_track_the_eager_loss_curve(tmp_path, backend, precision):
    """The digits demo model, 200 steps from the same initialisation: the fast step's loss curve follows
    the eager one. The draws differ (device vs host RNG), so compare means over windows of 50 steps
    (per-step losses have a spread of ~30%); bound: 15% per window (measured: within 6%)."""
    from cbdm_fast.training.config import TrainConfig, apply_preset

    def curve(name, **run):
        cfg = apply_preset(TrainConfig(), explicit=set())
        cfg.optim.steps = 200
        cfg.run.logdir, cfg.run.progress, cfg.run.device = str(tmp_path / name), False, "cpu"
        for k, v in run.items():
            setattr(cfg.run, k, v)
        trainer = Trainer(cfg, log=lambda s: None)
        return torch.tensor([trainer.train_step()["loss"] for _ in range(200)])

    ref = curve("eager", backend="eager")
    got = curve(backend, backend=backend, precision=precision)
    for w in range(4):
        a, b = got[50 * w:50 * (w + 1)].mean(), ref[50 * w:50 * (w + 1)].mean()
        assert abs(a - b) <= 0.15 * b, (w, float(a), float(b))
    assert ref[150:].mean() < 0.5 * ref[:10].mean()  # the curve is a learning curve, not noise
