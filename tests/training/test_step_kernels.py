"""The fast steps on our kernels or on torch's (--kernels; training/step.py BatchedLoss): the same step.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py), at ~0.02-0.05 s per
(sample, group) program of every GroupNorm call, so the fused-kernel steps here use the smallest UNet
with every block kind (one level: ResBlocks, attention, the time-embedding add) and a batch of 2.

Tolerances (fp32, CPU), one step from the same weights and the same draws, against the eager reference
step (two forwards of B, torch's kernels): losses rel 1e-5 as tests/training/test_fast_step.py (measured: 0 on
torch's kernels, 7e-8 on ours); parameters and EMA max |diff| <= 1e-3 lr (measured 1.2e-4 lr on torch's
kernels, 2.2e-4 lr on ours). That is 10x test_fast_step.py's one-step bound because this UNet's Adam
sees gradients near its eps: the first Adam step moves a weight by lr g / (|g| + eps), so the
1e-5-gain last convolution of each ResBlock turns ulp-level gradient differences (one 2B forward
against two of B; our GroupNorm and SDPA against torch's) into 1e-4 lr moves, the effect that
test_fast_step.py bounds over 10 steps at 0.25 lr. The compiled steps use aot_eager (the
dynamo + AOTAutograd graph on eager kernels, as tests/training/test_fast_step.py; inductor on a CPU compiles
for minutes) and must be ONE graph with the fused ops inside it as opaque custom ops.
"""
import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

from cbdm_fast.model import UNet
from cbdm_fast.nn import FusedAttnBlock, GroupNormSiLU
from cbdm_fast.schedule import Schedule
from cbdm_fast.training import FastStep
from cbdm_fast.training.config import AUTO_KERNELS, resolve_kernels
from cbdm_fast.training.draws import Draws
from cbdm_fast.training.step import BatchedLoss, StepConfig, eager_step, make_optimizer
from cli_helpers import usage_error
from train_helpers import TINY_FLAGS, max_diff, rel

T, B, NC, LR = 100, 2, 10, 1e-3
FUSED_OPS = {"cbdm_fast.q_sample", "cbdm_fast.group_norm_silu", "cbdm_fast.cb_loss"}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_unet():
    """One level of 32 channels: 5 ResBlocks (10 norms, 5 time-embedding adds), 4 attention blocks, the
    output norm: 15 GroupNorms."""
    torch.manual_seed(0)
    return UNet(T=T, ch=32, ch_mult=[1], attn=[0], num_res_blocks=1, dropout=0.0, cond=True, num_class=NC, in_ch=1)


def fixed_draws(keep):
    g = torch.Generator().manual_seed(4)
    x_0 = torch.rand((B, 1, 8, 8), generator=g) * 2 - 1
    y = torch.randint(NC, (B,), generator=g)
    t = torch.tensor([17, 83])
    noise = torch.randn(x_0.shape, generator=g)
    return x_0, y, Draws(t, noise, torch.tensor(keep), torch.randint(NC, (B,), generator=g))


def ops_in(gm) -> set:
    """The cbdm_fast custom ops a dynamo graph calls."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("cbdm_fast.")}


def recording_aot_eager(graphs):
    """aot_eager that keeps the dynamo graphs it is given (one per compiled region)."""
    inner = aot_autograd(fw_compiler=boxed_nop)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)
    return backend


# ---------------------------------------------------------------------------------- the choice
def test_auto_resolves_from_one_table_per_device_type_and_says_why():
    assert resolve_kernels("auto", "compiled", "cuda")[0] == "inductor"  # the only one measured in the step
    assert resolve_kernels("auto", "fused", "cuda")[0] == "fused"        # today's uncompiled GPU step
    for backend in ("fused", "compiled"):
        kernels, why = resolve_kernels("auto", backend, "cpu")
        assert kernels == "inductor" and why.startswith("auto -> inductor: ") and "interpreter" in why
    assert resolve_kernels("auto", "compiled", "mps")[0] == "inductor"
    assert resolve_kernels("fused", "compiled", "cpu") == ("fused", "chosen with --kernels")
    assert "bench/RESULTS.md" in AUTO_KERNELS[("cuda", "compiled")][1]


def test_batched_loss_patches_the_model_only_on_our_kernels():
    fused, plain = small_unet(), small_unet()
    BatchedLoss(fused, Schedule(T), StepConfig(kernels="fused"))
    BatchedLoss(plain, Schedule(T), StepConfig(kernels="inductor"))
    assert sum(isinstance(m, FusedAttnBlock) for m in fused.modules()) == 4
    assert sum(isinstance(m, GroupNormSiLU) for m in fused.modules()) == 15
    assert not any(isinstance(m, (FusedAttnBlock, GroupNormSiLU)) for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()


# ------------------------------------------------------------- the compiled step vs the reference
@pytest.mark.parametrize("backend", ["fused", "compiled"])
@pytest.mark.parametrize("kernels", ["fused", "inductor"])
def test_fast_step_equals_the_eager_reference_step(backend, kernels):
    """One fast step against the authors' eager step on the same draws. compiled: q_sample, the 2B forward
    and the loss in ONE graph, with our kernels the three fused ops as custom ops inside it; fused
    (uncompiled): our kernels through their eager autograd paths."""
    net = small_unet()
    x_0, y, draws = fixed_draws(1.0)
    cfg = StepConfig(method="cbdm", tau=1.0, ema_decay=0.9, kernels=kernels)

    ref, ref_ema = copy.deepcopy(net), copy.deepcopy(net).eval().requires_grad_(False)
    want = eager_step(ref, ref_ema, torch.optim.Adam(ref.parameters(), lr=LR), Schedule(T), x_0, y, draws, cfg)

    model, ema = copy.deepcopy(net), copy.deepcopy(net).eval().requires_grad_(False)
    graphs = []
    torch._dynamo.reset()
    fast = FastStep(model, ema, make_optimizer(model.parameters(), LR, "cpu"), Schedule(T), cfg, lambda x: draws,
                    backend=backend, compile_options={"backend": recording_aot_eager(graphs)})
    got = fast(x_0, y)
    torch._dynamo.reset()

    if backend == "compiled":
        assert len(graphs) == 1  # fullgraph: q_sample, the network and the loss in one graph
        assert ops_in(graphs[0]) == (FUSED_OPS if kernels == "fused" else set())
    else:
        assert not graphs
    for k in want:
        assert rel(got[k], want[k]) <= 1e-5 or abs(float(got[k]) - float(want[k])) <= 1e-7, (k, got[k], want[k])
    assert max_diff(model, ref) <= 1e-3 * LR
    assert max_diff(ema, ref_ema) <= 1e-3 * LR


def test_fused_kernels_compile_with_no_graph_break():
    """torch._dynamo.explain over the step's loss module with our kernels in: one graph, no break, and the
    three fused ops in it (the whole-batch label drop, keep 0, takes the same graph)."""
    model = small_unet()
    loss = BatchedLoss(model, Schedule(T), StepConfig(method="cbdm", kernels="fused"))
    x_0, y, d = fixed_draws(0.0)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(loss)(x_0, y, d.t, d.noise, d.keep.expand(B), d.y_bal)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert ops_in(explanation.graphs[0]) == FUSED_OPS


# --------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_replays_the_compiled_step_on_our_kernels(monkeypatch):
    """inductor around our custom ops, captured as ONE CUDA graph per step: the replays match the same
    compiled step without a graph (fp32, TF32 off; rel 1e-3 per step as tests/training/test_fast_step.py,
    CUDA backward atomics) and never sync with the host."""
    from cbdm_fast.training.draws import class_cdf, draw_device
    import functools
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    net = UNet(T=T, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, cond=True, num_class=NC, in_ch=1)
    g = torch.Generator().manual_seed(3)
    data = [((torch.rand((6, 1, 8, 8), generator=g) * 2 - 1).cuda(), torch.randint(NC, (6,), generator=g).cuda())
            for _ in range(6)]
    cfg = StepConfig(method="cbdm", tau=1.0, ema_decay=0.9, kernels="fused")
    draw = functools.partial(draw_device, class_cdf=class_cdf(torch.linspace(1.0, 0.1, NC), "cuda"), T=T,
                             drop_p=0.3, cb=True)

    def run(cuda_graph):
        model = copy.deepcopy(net).cuda()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = make_optimizer(model.parameters(), LR, "cuda", capturable=cuda_graph)
        fast = FastStep(model, ema, opt, Schedule(T, device="cuda"), cfg, draw, backend="compiled",
                        cuda_graph=cuda_graph, warmup=2)
        torch.manual_seed(5)
        losses = []
        for i, (x, y) in enumerate(data):
            if cuda_graph and i == 4:  # steps 3.. are replays: no host sync in them
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                losses.append(fast(x, y)["loss"].clone())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert fast._graph is not None or not cuda_graph
        return [float(v) for v in losses]

    ref = run(False)
    torch._dynamo.reset()
    got = run(True)
    torch._dynamo.reset()
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, ref)), (got, ref)


# ---------------------------------------------------------------------- the training CLI
def test_train_kernels_flag_is_saved_said_and_changeable_on_resume(tmp_path, capsys):
    from cbdm_fast.train import main
    logdir = tmp_path / "run"
    base = TINY_FLAGS + ["--steps", "0", "--device", "cpu", "--backend", "fused", "--logdir", str(logdir),
                         "--threads", "1"]
    assert main(base + ["--kernels", "fused"]) == 0
    out = capsys.readouterr().out
    assert "kernels: fused (ours: q_sample, CBDM loss, GroupNorm+SiLU and SDPA attention" in out
    assert "chosen with --kernels" in out
    assert json.loads((logdir / "config.json").read_text())["run"]["kernels"] == "fused"
    # the same math on other kernels: a resumed run may switch (the backend it may not); one more step, as a
    # resume with nothing to train stops before the run's header
    assert main(base + ["--resume", "--kernels", "auto", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "kernels: inductor (torch's formulas); auto -> inductor: on a CPU" in out
    assert json.loads((logdir / "config.json").read_text())["run"]["kernels"] == "auto"


def test_train_kernels_fused_needs_a_fast_backend(tmp_path, capsys):
    from cbdm_fast.train import main
    argv = TINY_FLAGS + ["--backend", "eager", "--kernels", "fused", "--logdir", str(tmp_path)]
    err = usage_error(main, argv, capsys)
    assert "--kernels fused needs --backend fused or compiled" in err
