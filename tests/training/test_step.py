"""The batched CBDM step (cbdm_fast/training/step.py) against the eager reference step, on identical draws.

Tolerances (fp32, tiny UNet, CPU; measured values in comments):
- losses fused vs eager: rel 1e-5 (measured: bitwise equal after 1 step, <= 2e-7 over 10 steps)
- parameters after 1 step: max |diff| <= 1e-4 lr (measured <= 5e-7 lr); EMA 1e-3 lr (lerp rounding)
- 10 steps: parameters max |diff| <= 0.25 lr, rms <= 2e-3 lr (measured 0.08 lr / 3.4e-4 lr)
- EMA lerp vs the authors' loop: see test_ema_lerp_vs_authors_loop
- bf16 autocast loss vs fp32: rel 1e-2 (measured 6e-4)
"""
import copy

import pytest
import torch

from cbdm_fast.model import UNet
from cbdm_fast.schedule import Schedule
from cbdm_fast.training import Trainer, TrainingDiverged, ema_update, warmup_factor
from cbdm_fast.training.draws import Draws, class_cdf, draw_device, draw_flags, draw_host
from cbdm_fast.training.step import StepConfig, eager_step, ema_lerp_, ema_pairs, fused_step, make_optimizer
from train_helpers import max_diff, rel, tiny_config

T, B, NC, LR = 100, 6, 10, 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(cond=True):
    return UNet(T=T, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, cond=cond,
                num_class=NC, in_ch=1)


def make_state(model, fused, warmup=0):
    model = copy.deepcopy(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model.parameters(), LR, "cpu") if fused else torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(warmup))
    return model, ema, opt, sched


def batch(seed, size=8):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.rand((B, 1, size, size), generator=g) * 2 - 1
    y = torch.randint(NC, (B,), generator=g)
    return x_0, y


def fixed_draws(seed, x_0, keep, cb=True, per_sample=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(T, (B,), generator=g)
    noise = torch.randn(x_0.shape, generator=g)
    y_bal = torch.randint(NC, (B,), generator=g) if cb and keep is not None else None
    if per_sample:
        k = (torch.rand(B, generator=g) >= 0.5).float()
    else:
        k = torch.tensor(float(keep if keep is not None else 0.0))
    return Draws(t, noise, k, y_bal)


def run_step(fn, state, *args, **kwargs):
    """One step of ``fn`` (eager_step or fused_step) on a make_state tuple, then its scheduler, as the
    Trainer does."""
    model, ema, opt, sched = state
    out = fn(model, ema, opt, *args, **kwargs)
    sched.step()
    return out


# ------------------------------------------------------------------------ draw_host == Trainer
@pytest.mark.parametrize("overrides", [
    dict(method__label_drop=0.5),
    dict(method__label_drop=0.5, method__per_sample_drop=True),
    dict(method__method="cfg", method__label_drop=0.5),
    dict(method__method="uncond"),
])
def test_draw_host_eager_step_reproduces_trainer_bitwise(tmp_path, overrides):
    """The step the benchmark times (draw_host + eager_step on a batch) is the Trainer's, bit for bit."""
    steps = 5
    a = Trainer(tiny_config(tmp_path / "a", **overrides), log=lambda s: None)
    rng = torch.get_rng_state()
    ref = [a.train_step() for _ in range(steps)]

    b = Trainer(tiny_config(tmp_path / "b", **overrides), log=lambda s: None)
    torch.set_rng_state(rng)
    cfg = StepConfig.from_train_config(b.cfg)
    drop_p, cb = draw_flags(b.cfg.method.method, b.cfg.method.label_drop)
    got, kept = [], []
    for _ in range(steps):
        x_0, y = b.stream.next()
        d = draw_host(x_0, b.y_bal_probs, T, drop_p, cb, per_sample=b.cfg.method.per_sample_drop)
        kept.append(d.keep.ndim == 1 or bool(d.keep))
        out = run_step(eager_step, (b.model, b.ema, b.optimizer, b.scheduler), b.schedule, x_0, y, d, cfg)
        got.append({k: float(v) for k, v in out.items()})
    assert got == ref
    for m1, m2 in ((a.model, b.model), (a.ema, b.ema)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    if overrides.get("method__label_drop") and not overrides.get("method__per_sample_drop"):
        assert True in kept and False in kept  # with drop 0.5 and this seed, both branches ran


def test_eager_step_stops_before_the_update_on_a_non_finite_loss():
    net = tiny_unet()
    x_0, y = batch(12)
    me = make_state(net, fused=False)
    with torch.no_grad():
        me[0].head.weight.fill_(float("nan"))
    before = [{k: v.nan_to_num() for k, v in m.state_dict().items()} for m in me[:2]]
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 \(loss_ddpm=nan") as info:
        eager_step(*me[:3], Schedule(T), x_0, y, fixed_draws(13, x_0, 1.0), StepConfig(), step=7)
    assert info.value.step == 7
    for m, old in zip(me[:2], before):  # neither the model nor its EMA moved
        assert all(torch.equal(v.nan_to_num(), old[k]) for k, v in m.state_dict().items())
    assert not me[2].state  # Adam never stepped


# ------------------------------------------------------------------------ fused vs eager
@pytest.mark.parametrize("keep,per_sample", [(1.0, False), (0.0, False), (None, True)])
def test_fused_matches_eager_one_step(keep, per_sample):
    net = tiny_unet()
    x_0, y = batch(1)
    d = fixed_draws(2, x_0, 1.0 if per_sample else keep, per_sample=per_sample)
    if keep == 0.0:
        d.y_bal = torch.randint(NC, (B,))  # the device draws always carry y_bal; keep=0 must ignore it
    cfg = StepConfig(method="cbdm", tau=1.0, grad_clip=1.0, ema_decay=0.9)
    me = make_state(net, fused=False)
    mf = make_state(net, fused=True)
    ed = copy.copy(d)
    if keep == 0.0:
        ed.y_bal = None
    le = run_step(eager_step, me, Schedule(T), x_0, y, ed, cfg)
    lf = run_step(fused_step, mf, Schedule(T), x_0, y, d, cfg)
    for k in le:
        assert rel(lf[k], le[k]) <= 1e-5 or abs(float(lf[k]) - float(le[k])) <= 1e-7, (k, lf[k], le[k])
    if keep == 0.0:
        assert float(lf["loss_reg"]) == 0.0
    assert max_diff(mf[0], me[0]) <= 1e-4 * LR  # measured <= 5e-7 lr
    assert max_diff(mf[1], me[1]) <= 1e-3 * LR  # lerp vs ema*d + src*(1-d): measured 2.4e-4 lr (1 ulp)


@pytest.mark.parametrize("method", ["ddpm", "cfg"])
def test_fused_single_forward_methods_match_eager(method):
    net = tiny_unet()
    x_0, y = batch(3)
    cfg = StepConfig(method=method, ema_decay=0.9)
    for keep in ((1.0, 0.0) if method == "cfg" else (1.0,)):
        d = fixed_draws(4, x_0, keep, cb=False)
        me, mf = make_state(net, False), make_state(net, True)
        le = run_step(eager_step, me, Schedule(T), x_0, y, d, cfg)
        lf = run_step(fused_step, mf, Schedule(T), x_0, y, d, cfg)
        assert rel(lf["loss"], le["loss"]) <= 1e-5
        assert float(lf["loss_reg"]) == 0.0
        assert max_diff(mf[0], me[0]) <= 1e-3 * LR


def test_fused_uncond_matches_eager():
    net = tiny_unet(cond=False)
    x_0, _ = batch(5)
    d = fixed_draws(6, x_0, 1.0, cb=False)
    cfg = StepConfig(method="uncond", ema_decay=0.9)
    me, mf = make_state(net, False), make_state(net, True)
    le = run_step(eager_step, me, Schedule(T), x_0, None, d, cfg)
    lf = run_step(fused_step, mf, Schedule(T), x_0, None, d, cfg)
    assert rel(lf["loss"], le["loss"]) <= 1e-5
    assert max_diff(mf[0], me[0]) <= 1e-3 * LR


def test_fused_tracks_eager_over_ten_steps():
    net = tiny_unet()
    me, mf = make_state(net, False, warmup=2), make_state(net, True, warmup=2)
    cfg = StepConfig(method="cbdm", ema_decay=0.9)
    pairs = ema_pairs(mf[0], mf[1])
    worst = 0.0
    for step in range(10):
        x_0, y = batch(100 + step)
        d = fixed_draws(200 + step, x_0, 0.0 if step == 4 else 1.0)
        ed = copy.copy(d)
        if step == 4:
            ed.y_bal = None
        le = run_step(eager_step, me, Schedule(T), x_0, y, ed, cfg)
        lf = run_step(fused_step, mf, Schedule(T), x_0, y, d, cfg, ema_tensors=pairs)
        worst = max(worst, rel(lf["loss"], le["loss"]))
    assert worst <= 1e-5  # measured ~2e-7
    # Adam turns ulp-level gradient differences (the 2B conv sums differently from two B convs) into
    # O(lr) moves for weights whose gradient is near zero; measured max 0.08 lr, rms 3.4e-4 lr
    for a, b in ((mf[0], me[0]), (mf[1], me[1])):
        diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(a.parameters(), b.parameters())])
        assert diffs.max() <= 0.25 * LR and diffs.pow(2).mean().sqrt() <= 2e-3 * LR


def test_ema_lerp_vs_authors_loop():
    """foreach lerp (ema + w (src - ema), one rounding) vs the authors' ema*d + src*(1-d) (three roundings).

    Measured at decay 0.9999 over 1000 updates of O(0.1) weights: authors vs lerp 2.7e-5 abs; against an
    fp64 EMA the authors' formula drifts 2.8e-5, lerp 1.9e-6 (lerp is the more accurate one).
    """
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GroupNorm(8, 64), torch.nn.Linear(64, 8))
    a, b, c = copy.deepcopy(src), copy.deepcopy(src), copy.deepcopy(src).double()
    decay = 0.9999
    pairs = ema_pairs(src, b)
    for _ in range(300):
        with torch.no_grad():
            for p, pc in zip(src.parameters(), c.parameters()):
                p.add_(torch.randn_like(p) * 1e-2)
                pc.copy_(pc * decay + p.double() * (1 - decay))
        ema_update(src, a, decay)
        ema_lerp_(*pairs[:2], decay, pairs[2])
    err = lambda m: max((p.double() - q).abs().max().item() for p, q in zip(m.parameters(), c.parameters()))
    assert max_diff(a, b) <= 2e-5
    assert err(b) <= err(a)


# ------------------------------------------------------------------------ draw_device
def test_draw_device_distributions():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005, 0.0, 0.0], dtype=torch.float64)
    probs = probs / probs.sum()
    cdf = class_cdf(probs)
    assert cdf.dtype == torch.float64
    x_0 = torch.zeros(20000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    d = draw_device(x_0, cdf, T, 0.1, True, generator=g)
    assert d.t.dtype == torch.int64 and d.y_bal.dtype == torch.int64 and d.keep.dtype == torch.float32
    assert d.keep.ndim == 0 and d.noise.shape == x_0.shape
    for v in (d.t, d.noise, d.keep, d.y_bal):
        assert v.device == x_0.device
    assert int(d.t.min()) == 0 and int(d.t.max()) == T - 1
    counts = torch.bincount(d.y_bal, minlength=10).double()
    assert counts[8:].sum() == 0  # zero-probability classes are never drawn
    expected = probs * 20000
    nz = expected > 0
    chi2 = (((counts - expected)[nz]) ** 2 / expected[nz]).sum().item()
    assert chi2 < 30.0  # 7 d.o.f.: p(chi2 > 30) ~ 1e-4
    keeps = torch.stack([draw_device(x_0[:1], cdf, T, 0.1, True, generator=g).keep for _ in range(4000)])
    assert abs(keeps.mean().item() - 0.9) < 0.02
    ps = draw_device(x_0[:1].expand(4000, 1, 1, 1), cdf, T, 0.3, True, generator=g, per_sample=True)
    assert ps.keep.shape == (4000,) and abs(ps.keep.mean().item() - 0.7) < 0.03
    top = draw_device(x_0[:4], torch.tensor([0.5, 1.0 - 1e-17], dtype=torch.float64), T, 0.0, True)
    assert int(top.y_bal.max()) <= 1


@pytest.mark.gpu
def test_draw_device_and_fused_step_do_not_sync_on_gpu():
    dev = torch.device("cuda")
    net = tiny_unet().to(dev)
    model, ema = net, copy.deepcopy(net).eval().requires_grad_(False)
    opt = make_optimizer(model.parameters(), LR, dev)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sch = Schedule(T, device=dev)
    cdf = class_cdf(torch.full((NC,), 1.0 / NC), dev)
    x_0, y = (t.to(dev) for t in batch(7))
    cfg = StepConfig(method="cbdm", ema_decay=0.9)
    pairs = ema_pairs(model, ema)
    fused_step(model, ema, opt, sch, x_0, y, draw_device(x_0, cdf, T, 0.1, True), cfg, ema_tensors=pairs)  # warm-up
    sched.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = draw_device(x_0, cdf, T, 0.1, True)
        fused_step(model, ema, opt, sch, x_0, y, d, cfg, ema_tensors=pairs)
        sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert d.y_bal.device.type == "cuda" and d.keep.device.type == "cuda"


# ------------------------------------------------------------------------ amp / channels_last
def test_amp_bf16_loss_close_to_fp32():
    net = tiny_unet()
    torch.nn.init.normal_(net.tail[-1].weight, std=0.05)  # an O(1) output, so the bound means something
    x_0, y = batch(8, size=16)
    d = fixed_draws(9, x_0, 1.0)
    m32, mbf = make_state(net, True), make_state(net, True)
    l32 = run_step(fused_step, m32, Schedule(T), x_0, y, d, StepConfig(ema_decay=0.9))
    lbf = run_step(fused_step, mbf, Schedule(T), x_0, y, d, StepConfig(ema_decay=0.9, amp=True))
    assert all(torch.isfinite(v) for v in lbf.values())
    assert rel(lbf["loss"], l32["loss"]) <= 1e-2  # measured 6e-4 (bf16 has 8 mantissa bits)
    assert abs(float(lbf["loss_reg"]) - float(l32["loss_reg"])) <= 1e-3 * float(l32["loss"])


def test_channels_last_matches():
    net = tiny_unet()
    x_0, y = batch(10)
    d = fixed_draws(11, x_0, 1.0)
    ma, mb = make_state(net, True), make_state(net, True)
    mb[0].to(memory_format=torch.channels_last)
    la = run_step(fused_step, ma, Schedule(T), x_0, y, d, StepConfig(ema_decay=0.9))
    lb = run_step(fused_step, mb, Schedule(T), x_0, y, d, StepConfig(ema_decay=0.9, channels_last=True))
    assert rel(lb["loss"], la["loss"]) <= 1e-5
    assert max_diff(mb[0], ma[0]) <= 1e-3 * LR
