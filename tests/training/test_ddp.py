"""Data-parallel training (cbdm_fast/training/ddp.py) on the CPU with gloo, through torchrun.

The key property: 2 ranks with global batch 8 run the single-process algorithm on batch 8. The ranks
draw the whole global batch's randomness (t, noise, label drop, y_bal, data order, flips) from the
single process's streams and keep their slices, so with dropout 0 the runs differ only by fp32
reduction order (each rank's loss mean over 4 samples, DDP's gradient average, summation order in
the weight gradients).

Tolerances (tiny UNet, dropout 0, fp32, lr 2e-3 without warm-up, label drop 0.5 so whole-batch drops
occur, 4 steps):
- logged losses (printed with 5 decimals): |diff| <= 2e-5 per step (measured: equal);
- parameters after 4 steps: max |diff| <= 0.25 lr (measured 0.03 lr fused, 0.02 lr eager, on zero-initialised
  biases whose small gradients' signs and sizes Adam normalises); the label embedding, which a wrong
  label-drop skip would move by ~lr on a dropped batch: <= 0.05 lr (measured 0.009 lr); EMA (decay 0.995):
  <= 0.01 lr (measured 2e-4 lr). A different draw would change the losses by ~1e-2;
- resume on 2 ranks from a 2-rank checkpoint: bit-identical to the uninterrupted 2-rank run.
"""
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast import dist
from cbdm_fast.data import BatchStream, LabeledImages
from cbdm_fast.train import main as train_main
from cbdm_fast.training import ddp
from cbdm_fast.training.draws import class_cdf, draw_device

REPO = Path(__file__).resolve().parents[2]
LR = 2e-3
FLAGS = ["--ch", "32", "--ch-mult", "1", "2", "--attn", "1", "--num-res-blocks", "1", "--T", "100",
         "--batch-size", "8", "--dropout", "0", "--label-drop", "0.5", "--lr", str(LR), "--warmup", "0",
         "--device", "cpu", "--precision", "fp32", "--threads", "1", "--no-progress", "--log-every", "1",
         "--sample-per-class", "1"]
LOSS_LINE = re.compile(r"^step (\d+)/\d+ loss (\S+) loss_ddpm (\S+) loss_reg (\S+)", re.M)
ENV = {**os.environ, "CBDM_FAST_NO_EXT": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nproc, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), "-m", "cbdm_fast.train", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def losses(text):
    return {int(m.group(1)): tuple(float(v) for v in m.groups()[1:]) for m in LOSS_LINE.finditer(text)}


def weights(path, which):
    return ckpt_io.load(path)[which]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per backend: a 2-rank torchrun run and the same run in one process (4 steps, ckpt at 2 and 4)."""
    cache = {}

    def get(backend, augm=False):
        key = (backend, augm)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ddp_{backend}{'_augm' if augm else ''}")
            flags = FLAGS + ["--backend", backend, "--steps", "4", "--save-every", "2"] + (["--augm"] if augm else [])
            two = torchrun(2, *flags, "--logdir", str(root / "two"))
            assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
            import contextlib
            import io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = train_main(flags + ["--logdir", str(root / "one")])
            assert rc == 0
            cache[key] = root, two.stdout, buf.getvalue()
        return cache[key]

    return get


@pytest.mark.parametrize("backend,augm", [("fused", False), ("eager", False), ("fused", True), ("eager", True)])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, backend, augm):
    """--augm too: the ADA parameters of the global batch are drawn on every rank, each keeps its rows."""
    root, out_two, out_one = runs(backend, augm)
    assert "data parallel: 2 ranks (DDP over gloo), 4 images per rank of the global batch 8" in out_two
    assert out_two.count("step 4/4") == 1  # rank 0 alone logs
    l2, l1 = losses(out_two), losses(out_one)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert all(abs(a - b) <= 2e-5 for a, b in zip(l1[step], l2[step])), (step, l1[step], l2[step])
    # label drop 0.5: both a whole-batch drop (loss_reg exactly 0) and a kept batch occur in 4 steps,
    # so the label embedding's skip on dropped batches is exercised under DDP
    assert any(v[2] == 0.0 for v in l1.values()) and any(v[2] > 0 for v in l1.values())
    assert [p.name for p in ckpt_io.find_checkpoints(root / "two")] == ["ckpt_2.pt", "ckpt_4.pt"]
    two, one = ckpt_io.load(root / "two" / "ckpt_4.pt"), ckpt_io.load(root / "one" / "ckpt_4.pt")
    assert max_diff(two["model"], one["model"]) <= 0.25 * LR
    emb = "label_embedding.weight"
    assert max_diff({emb: two["model"][emb]}, {emb: one["model"][emb]}) <= 0.05 * LR
    assert max_diff(two["ema"], one["ema"]) <= 0.01 * LR
    state = ckpt_io.load(root / "two" / "ckpt_4.pt")
    assert state["step"] == 4 and state["rng"]["world_size"] == 2 and len(state["rng"]["ranks"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the UNet's own names


def test_checkpoint_resumes_exactly_on_two_ranks(runs, tmp_path):
    root, out_two, _ = runs("fused")
    res = torchrun(2, "--resume", str(root / "two" / "ckpt_2.pt"), "--steps", "4", "--logdir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming {root / 'two' / 'ckpt_2.pt'} at step 2" in res.stdout
    l_full, l_res = losses(out_two), losses(res.stdout)
    assert sorted(l_res) == [3, 4] and all(l_res[s] == l_full[s] for s in l_res)
    for which in ("model", "ema", "optimizer"):
        a, b = ckpt_io.load(tmp_path / "ckpt_4.pt")[which], ckpt_io.load(root / "two" / "ckpt_4.pt")[which]
        if which == "optimizer":
            a, b = ({(i, k): v for i, s in x["state"].items() for k, v in s.items()} for x in (a, b))
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path, capsys):
    """The data order and the draws continue exactly in one process (dropout 0): same as the 2-rank run."""
    root, out_two, _ = runs("fused")
    assert train_main(["--resume", str(root / "two" / "ckpt_2.pt"), "--steps", "4", "--logdir", str(tmp_path)]) == 0
    l_full, l_res = losses(out_two), losses(capsys.readouterr().out)
    assert sorted(l_res) == [3, 4]
    assert all(abs(a - b) <= 2e-5 for s in l_res for a, b in zip(l_res[s], l_full[s]))


def test_mid_run_grids_on_two_ranks(tmp_path):
    """Rank 0 draws the grid of step 2 while rank 1 waits in the stop check that follows every grid."""
    res = torchrun(2, *FLAGS, "--backend", "fused", "--steps", "4", "--sample-every", "2", "--logdir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "samples" / "0000002.png").is_file() and (tmp_path / "samples" / "0000004.png").is_file()
    assert sorted(losses(res.stdout)) == [1, 2, 3, 4]


def test_batch_size_not_divisible_by_the_world_size_is_named(tmp_path):
    res = torchrun(2, *FLAGS, "--batch-size", "7", "--steps", "1", "--logdir", str(tmp_path), timeout=120)
    assert res.returncode != 0
    assert "error: --batch-size 7 (the global batch) is not divisible by WORLD_SIZE 2" in res.stderr
    assert f'File "{REPO / "cbdm_fast"}' not in res.stderr  # a message from our code, not a traceback
    with pytest.raises(ValueError, match=r"--batch-size 10 \(the global batch\) is not divisible by WORLD_SIZE 4"):
        dist.check_batch_size(10, 4)
    dist.check_batch_size(12, 4)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_rank0_saves(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cbdm_fast.train", *FLAGS, "--backend", "fused", "--steps", "100000",
                             "--save-every", "0", "--logdir", str(tmp_path)],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.time() + 120
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step 3/") or time.time() > deadline:
                break
        workers = _children(proc.pid)
        rank1 = [pid for pid in workers if _environ(pid).get("RANK") == "1"]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)  # only rank 1 hears it
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # every rank exits 75 (stopped, checkpoint saved); torchrun reports it and exits 1 (README, "Exit codes")
    assert proc.returncode == 1 and "(exitcode: 75)" in out, out[-3000:]
    assert "[rank 1] SIGTERM received" in out and "another rank received a signal" in out
    assert "torchrun --nproc_per_node 2 -m cbdm_fast.train --resume" in out
    ckpts = ckpt_io.find_checkpoints(tmp_path)
    assert len(ckpts) == 1
    state = ckpt_io.load(ckpts[0])
    assert 3 <= state["step"] < 100000 and len(state["rng"]["ranks"]) == 2


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _environ(pid):
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# ------------------------------------------------------------------------- in-process units
def _images(n):
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 3, 1).contiguous().numpy()
    imgs[:, :, 0] = 255  # the left column marks flips
    return LabeledImages(imgs, (torch.arange(n) % 3).numpy(), 3)


@pytest.mark.parametrize("hflip", [False, True])
def test_rank_streams_slice_the_single_process_batches(hflip):
    data = _images(22)
    one = BatchStream(data, 8, seed=4, hflip=hflip)
    ranks = [BatchStream(data, 8, seed=4, hflip=hflip, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # crosses epoch boundaries (2 batches of 8 per epoch)
        x, y = one.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    s0, s1 = ranks[0].state_dict(), ranks[1].state_dict()
    assert torch.equal(s0["generator"], s1["generator"]) and s0["pos"] == s1["pos"] == one.state_dict()["pos"]
    # a rank stream resumes from the single-process state (the state does not depend on the world size)
    r = BatchStream(data, 8, seed=99, hflip=hflip, rank=1, world_size=2)
    r.load_state_dict(one.state_dict())
    assert torch.equal(r.next()[0], one.next()[0][4:])
    with pytest.raises(ValueError, match="batch_size 8 .* not divisible by the world size 3"):
        BatchStream(data, 8, rank=0, world_size=3)


@pytest.mark.parametrize("per_sample", [False, True])
def test_global_draws_sliced_equal_the_single_process_draws(per_sample):
    x = torch.zeros(8, 1, 4, 4)
    cdf = class_cdf(torch.tensor([5.0, 3.0, 1.0]))
    want = draw_device(x, cdf, 100, 0.4, True, generator=torch.Generator().manual_seed(3), per_sample=per_sample)
    for rank in range(2):
        ctx = dist.Context(rank=rank, world_size=2, local_rank=rank)
        draw = functools.partial(draw_device, class_cdf=cdf, T=100, drop_p=0.4, cb=True,
                                 generator=torch.Generator().manual_seed(3), per_sample=per_sample)
        got = ddp.rank_draws(draw, ctx)(x[:4])
        part = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(got.t, want.t[part]) and torch.equal(got.noise, want.noise[part])
        assert torch.equal(got.y_bal, want.y_bal[part])
        assert torch.equal(got.keep, want.keep[part] if per_sample else want.keep)


def test_environment_is_read_and_checked(monkeypatch):
    for name in dist.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert dist.from_env() == dist.Context() and not dist.from_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = dist.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (2, 4, 0, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        dist.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        dist.from_env()
    seeds = {dist.rank_seed(0, r) for r in range(8)} | {dist.rank_seed(1, 0), dist.rank_seed(0, 0, 5)}
    assert len(seeds) == 10


CALLER_GROUP_SCRIPT = """
import os, sys, torch, torch.distributed as tdist
from cbdm_fast import dist
tdist.init_process_group("gloo")            # the caller's own group, before any cbdm_fast code runs
rank = tdist.get_rank()
for _ in range(2):                          # e.g. sample.main called twice in-process
    ctx, _ = dist.setup(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.enabled) == (rank, 2, True), ctx
    assert dist.all_gather_object(rank) == [0, 1]
    assert dist.any_true(rank == 1)
    dist.cleanup()
    assert tdist.is_initialized(), "cleanup destroyed the caller's group"
    assert dist.context() == dist.Context()
os.environ["RANK"] = str(1 - rank)          # an environment that contradicts the group is named
try:
    dist.setup(torch.device("cpu"))
except ValueError as exc:
    assert "already initialised has rank" in str(exc), exc
else:
    raise AssertionError("no error for a mismatched RANK")
os.environ["RANK"] = str(rank)
tdist.barrier()
tdist.destroy_process_group()
open(os.path.join(sys.argv[1], f"ok_{rank}"), "w").close()  # (printed lines of two ranks interleave)
"""


def test_a_group_the_caller_initialised_is_used_and_left_up(tmp_path):
    script = tmp_path / "caller_group.py"
    script.write_text(CALLER_GROUP_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.glob("ok_*")) == ["ok_0", "ok_1"]


# ----------------------------------------------------------------------------------- GPUs
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "compiled"])
def test_two_gpus_match_one_gpu(tmp_path, backend):
    """NCCL on 2 GPUs vs 1 GPU, fp32 with TF32 on (torch's default for cuDNN convolutions): the draws are
    the same, the arithmetic differs by reduction order and non-deterministic CUDA kernels (embedding and
    weight-gradient atomics), which Adam carries forward: tolerances are loose (not yet measured)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    flags = [f if f != "cpu" else "cuda" for f in FLAGS] + ["--backend", backend, "--steps", "4"]
    two = torchrun(2, *flags, "--logdir", str(tmp_path / "two"), timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "DDP over nccl" in two.stdout
    one = subprocess.run([sys.executable, "-m", "cbdm_fast.train", *flags, "--logdir", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    l2, l1 = losses(two.stdout), losses(one.stdout)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert all(abs(a - b) <= 1e-2 * max(abs(a), 1e-3) + 1e-4 for a, b in zip(l1[step], l2[step])), step
    for which in ("model", "ema"):
        a, b = weights(tmp_path / "two" / "ckpt_4.pt", which), weights(tmp_path / "one" / "ckpt_4.pt", which)
        assert max_diff(a, b) <= 2 * LR, which


def _one_rank_fast_step(device, tmp_store, cuda_graph):
    """(FastStep over a DDP-wrapped tiny UNet in the current one-process group, its LR scheduler)."""
    import copy as _copy
    from cbdm_fast.model import UNet
    from cbdm_fast.schedule import Schedule
    from cbdm_fast.training import FastStep
    from cbdm_fast.training.step import StepConfig, make_optimizer
    torch.manual_seed(0)
    model = UNet(T=100, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, cond=True, num_class=10,
                 in_ch=1).to(device)
    ema = _copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model.parameters(), LR, device, capturable=cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    side = torch.cuda.Stream(device) if cuda_graph else None
    generator = torch.Generator(device=device).manual_seed(1)
    draw = functools.partial(draw_device, class_cdf=class_cdf(torch.linspace(1.0, 0.1, 10), device), T=100,
                             drop_p=0.3, cb=True, generator=generator)
    schedule, cfg = Schedule(100, device=device), StepConfig(method="cbdm", tau=1.0)
    fast = FastStep(model, ema, opt, schedule, cfg, ddp.rank_draws(draw, dist.Context()),
                    loss=ddp.wrap_step(model, schedule, device, cfg, eager=False, stream=side),
                    reduce=dist.all_reduce_mean, backend="compiled", compile_options={"backend": "aot_eager"},
                    cuda_graph=cuda_graph, side_stream=side, generators=[generator] if cuda_graph else (),
                    warmup=ddp.DDP_GRAPH_WARMUP if cuda_graph else 3)
    return fast, sched


def test_ddp_cuda_graph_needs_its_side_stream():
    from cbdm_fast.model import UNet
    from cbdm_fast.training import FastStep, StepConfig
    net = UNet(T=10, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, num_class=2, in_ch=1)
    with pytest.raises(ValueError, match="needs side_stream"):
        FastStep(net, None, None, None, StepConfig(), None, loss=net, cuda_graph=True)


@pytest.mark.gpu
def test_ddp_step_replayed_as_a_cuda_graph_matches_the_ddp_step_without_one(tmp_path, monkeypatch):
    """One-process NCCL group; DDP_GRAPH_WARMUP eager steps, then replays. fp32 with TF32 off; the same
    tolerance as the single-process graph test (test_fast_step.py: CUDA atomics, carried by Adam)."""
    import torch.distributed as dist
    import torch._dynamo
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    device = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(3)
    data = [((torch.rand((6, 1, 8, 8), generator=g) * 2 - 1).to(device), torch.randint(10, (6,), generator=g).to(device))
            for _ in range(ddp.DDP_GRAPH_WARMUP + 4)]
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        runs = {}
        for graph in (False, True):
            fast, sched = _one_rank_fast_step(device, tmp_path, graph)
            torch.manual_seed(5)
            runs[graph] = []
            for x, y in data:
                runs[graph].append(float(fast(x, y)["loss"]))
                sched.step()
            assert (fast._graph is not None) == graph
            torch._dynamo.reset()
    finally:
        dist.destroy_process_group()
    ref, got = runs[False], runs[True]
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, ref)), (got, ref)
