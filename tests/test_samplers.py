"""Samplers: ddpm_sample (ops.ddpm_step) against the authors' loop reference_sample, labels, guidance
inputs, and x0 clipping. Tiny UNets (ch 32, 8x8 images, T = 20) so everything runs in seconds on a CPU.

Tolerance of ddpm_sample vs reference_sample: 1e-5 absolute on images in [-1, 1] (both do the same
float32 operations in the same order with the same noise; the difference is at most rounding).
"""
import pytest
import torch

from cbdm_fast import ops
from cbdm_fast.model import UNet
from cbdm_fast.samplers import (class_balanced_labels, ddpm_sample, guided_eps, reference_sample,
                                uniform_labels)
from cbdm_fast.schedule import Schedule

T, C, SIZE, B = 20, 4, 8, 5
ATOL = 1e-5
BACKENDS = ["reference", pytest.param("extension", marks=pytest.mark.skipif(
    not ops.extension_available(), reason="the compiled extension cbdm_fast._C is not available"))]


def tiny_unet(cond=True, augm=False, seed=0):
    """A tiny UNet with perturbed weights, so eps depends visibly on x, t, y (the init's tail gain
    of 1e-5 would make eps almost 0)."""
    torch.manual_seed(seed)
    model = UNet(T=T, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, cond=cond,
                 augm=augm, num_class=C, in_ch=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def cond_model():
    return tiny_unet(cond=True)


def x_T_and_gen(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, SIZE, SIZE, generator=g), g


_REFERENCE = {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("method", ["cfg", "cond", "uncond"])
def test_ddpm_sample_matches_reference(cond_model, method, var_type, clip_x0, backend):
    schedule = Schedule(T)
    y = torch.tensor([0, 1, 2, 3, 1])
    kw = dict(omega=1.6, method=method, var_type=var_type, clip_x0=clip_x0)
    key = (method, var_type, clip_x0)
    if key not in _REFERENCE:  # shared by both backends
        x_T, g1 = x_T_and_gen()
        _REFERENCE[key] = reference_sample(cond_model, schedule, x_T, y, generator=g1, **kw)
    ref = _REFERENCE[key]
    x_T2, g2 = x_T_and_gen()
    steps = []
    out = ddpm_sample(cond_model, schedule, x_T2, y, generator=g2, backend=backend, progress=steps.append, **kw)
    assert out.shape == x_T2.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert steps == list(reversed(range(T)))
    assert out.abs().max() <= 1.0
    # the guidance actually matters in this setup (the comparison is not trivially of two constants)
    if method == "cfg" and var_type == "fixedlarge" and not clip_x0:
        x_T3, g3 = x_T_and_gen()
        plain = ddpm_sample(cond_model, schedule, x_T3, y, omega=0.0, method="cfg", generator=g3, backend=backend)
        assert (plain - out).abs().max() > 1e-3


def test_same_generator_seed_gives_same_samples(cond_model):
    schedule = Schedule(T)
    y = torch.arange(B) % C
    outs = []
    for _ in range(2):
        x_T, g = x_T_and_gen(seed=7)
        outs.append(ddpm_sample(cond_model, schedule, x_T, y, omega=1.0, generator=g))
    assert torch.equal(outs[0], outs[1])
    x_T, g = x_T_and_gen(seed=8)
    assert not torch.equal(outs[0], ddpm_sample(cond_model, schedule, x_T, y, omega=1.0, generator=g))


def test_class_balanced_labels_are_exact_and_in_class_order():
    y = class_balanced_labels(3, 5)
    assert y.dtype == torch.int64 and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert torch.bincount(y, minlength=5).tolist() == [3] * 5


def test_uniform_labels_count_range_and_reproducibility():
    a = uniform_labels(500, 7, generator=torch.Generator().manual_seed(0))
    b = uniform_labels(500, 7, generator=torch.Generator().manual_seed(0))
    assert a.shape == (500,) and torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 7
    assert (torch.bincount(a, minlength=7) > 0).all()  # every class drawn (probability ~1 - 1e-32)


def test_uncond_needs_no_labels_cfg_and_cond_do(cond_model):
    schedule = Schedule(T)
    x_T, g = x_T_and_gen()
    out = ddpm_sample(cond_model, schedule, x_T, None, method="uncond", generator=g)
    assert out.shape == x_T.shape
    out = ddpm_sample(tiny_unet(cond=False), schedule, x_T, None, method="uncond", generator=g)
    assert out.shape == x_T.shape
    for method in ("cfg", "cond"):
        with pytest.raises(ValueError, match="needs labels"):
            ddpm_sample(cond_model, schedule, x_T, None, omega=1.0, method=method)
        with pytest.raises(ValueError, match="needs labels"):
            reference_sample(cond_model, schedule, x_T, None, omega=1.0, method=method)
    with pytest.raises(ValueError, match="conditional model"):
        ddpm_sample(tiny_unet(cond=False), schedule, x_T, torch.zeros(B, dtype=torch.long), method="cfg")
    with pytest.raises(ValueError, match="method"):
        ddpm_sample(cond_model, schedule, x_T, None, method="guided")


@pytest.mark.parametrize("bad", [C, -1])
def test_label_out_of_range_raises(cond_model, bad):
    x_T, g = x_T_and_gen()
    y = torch.tensor([0, 1, bad, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        ddpm_sample(cond_model, Schedule(T), x_T, y, omega=1.0, generator=g)


def test_wrong_label_shape_raises(cond_model):
    x_T, _ = x_T_and_gen()
    with pytest.raises(ValueError, match="shape"):
        ddpm_sample(cond_model, Schedule(T), x_T, torch.zeros(B + 1, dtype=torch.long), omega=1.0)


@pytest.mark.parametrize("method,omega", [("cfg", 1.4), ("cfg", 0.0), ("cond", 1.4), ("uncond", 0.0)])
def test_ada_model_gets_zero_augm_on_conditional_pass_and_none_on_unconditional(monkeypatch, method, omega):
    model = tiny_unet(cond=True, augm=True)
    calls = []
    forward = model.forward

    def spy(x, t, y=None, augm=None, y_mask=None):
        calls.append((y, None if augm is None else augm.clone()))
        return forward(x, t, y=y, augm=augm, y_mask=y_mask)

    monkeypatch.setattr(model, "forward", spy)
    x_T, g = x_T_and_gen()
    y = torch.arange(B) % C
    # the authors' two-pass pattern (the default batches both passes into one forward; see below)
    ddpm_sample(model, Schedule(T), x_T, y, omega=omega, method=method, generator=g, batch_guidance=False)

    guided = method == "cfg" and omega > 0
    assert len(calls) == T * (2 if guided else 1)
    first_pass = calls[0::2] if guided else calls
    for y_seen, augm in first_pass:  # the "conditional" pass of every step
        assert (y_seen is None) == (method == "uncond")
        if y_seen is not None:
            assert torch.equal(y_seen, y)
        assert augm is not None and augm.shape == (B, 9) and not augm.any()
    if guided:
        for y_seen, augm in calls[1::2]:  # the unconditional pass: no label, no ADA vector
            assert y_seen is None and augm is None


def test_guided_eps_single_forward_without_guidance(cond_model):
    x = torch.randn(B, 3, SIZE, SIZE)
    t = torch.full((B,), T - 1)
    y = torch.arange(B) % C
    eps_c, eps_u = guided_eps(cond_model, x, t, y, omega=0.0, method="cfg")
    assert eps_u is None and eps_c.shape == x.shape
    eps_c2, eps_u = guided_eps(cond_model, x, t, y, omega=2.0, method="cfg")
    assert eps_u is not None and torch.equal(eps_c, eps_c2)
    torch.testing.assert_close(eps_u, cond_model(x, t))


def _zero_eps_model():
    """A UNet whose output is exactly 0 (tail conv zeroed): x0_pred = sqrt(1/ab_t) x_t leaves [-1, 1]."""
    model = tiny_unet(cond=True)
    with torch.no_grad():
        model.tail[-1].weight.zero_()
        model.tail[-1].bias.zero_()
    return model


def _manual_zero_eps_loop(x_T, g, schedule, clip):
    """The ancestral loop written out for eps = 0, from the float32 sampling table."""
    table = schedule.sampling_table("fixedlarge")
    x = x_T.clone()
    for step in reversed(range(schedule.T)):
        sqrt_recip_ab, _, coef1, coef2, sigma = table[:, step]
        x0 = sqrt_recip_ab * x
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = coef1 * x0 + coef2 * x
        x = mean + sigma * torch.randn(x.shape, generator=g) if step > 0 else mean
    return x.clamp(-1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_x0_is_off_by_default_and_changes_the_result_when_x0_leaves_the_range(backend):
    model, schedule = _zero_eps_model(), Schedule(T)
    y = torch.arange(B) % C
    x_T, _ = x_T_and_gen()
    t = torch.full((B,), T - 1)
    assert model(x_T, t, y).abs().max() == 0
    x0_first = schedule.sqrt_recip_alphas_bar[T - 1].float() * x_T
    assert x0_first.abs().max() > 1.2  # the construction: x0_pred leaves [-1, 1]

    def run(**kw):
        x, g = x_T_and_gen()
        return ddpm_sample(model, schedule, x, y, method="cond", generator=g, backend=backend, **kw)

    default, unclipped, clipped = run(), run(clip_x0=False), run(clip_x0=True)
    assert torch.equal(default, unclipped)
    assert (clipped - unclipped).abs().max() > 1e-3
    x, g = x_T_and_gen()
    torch.testing.assert_close(default, _manual_zero_eps_loop(x, g, schedule, clip=False), atol=ATOL, rtol=0)
    x, g = x_T_and_gen()
    torch.testing.assert_close(clipped, _manual_zero_eps_loop(x, g, schedule, clip=True), atol=ATOL, rtol=0)
    # and reference_sample agrees on both
    x, g = x_T_and_gen()
    torch.testing.assert_close(reference_sample(model, schedule, x, y, method="cond", generator=g), default,
                               atol=ATOL, rtol=0)
    x, g = x_T_and_gen()
    torch.testing.assert_close(reference_sample(model, schedule, x, y, method="cond", clip_x0=True, generator=g),
                               clipped, atol=ATOL, rtol=0)


class OracleEps(torch.nn.Module):
    """The exact eps of a data set holding one image per class: eps = (x_t - sqrt(ab_t) x*_y) / sqrt(1 - ab_t).
    Ancestral sampling with it must land on x*_y: x0_pred is x*_y at every step and coef2 = 0 at t = 0."""

    def __init__(self, schedule, targets):
        super().__init__()
        self.schedule, self.targets = schedule, targets
        self.label_embedding = torch.nn.Embedding(len(targets), 1)  # marks the model as conditional
        self.augm_embedding = None

    def forward(self, x, t, y=None, augm=None):
        target = self.targets[y] if y is not None else self.targets.mean(0, keepdim=True)
        ab = self.schedule.alphas_bar[t].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * target.double()) / (1 - ab).sqrt()).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_sampling_with_the_exact_eps_recovers_the_data(var_type, backend):
    schedule = Schedule(T)
    targets = torch.rand(C, 3, SIZE, SIZE) * 1.8 - 0.9
    model = OracleEps(schedule, targets)
    y = torch.tensor([3, 0, 2, 1, 3])
    x_T, g = x_T_and_gen()
    out = ddpm_sample(model, schedule, x_T, y, omega=0.0, method="cond", var_type=var_type, generator=g,
                      backend=backend)
    torch.testing.assert_close(out, targets[y], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- batched guidance (one 2B forward)

@pytest.mark.parametrize("augm", [False, True])
def test_batched_guidance_equals_two_forwards(augm):
    from cbdm_fast.samplers import batched_guided_eps, guided_eps

    model = tiny_unet(cond=True, augm=augm)
    x = torch.randn(3, model.in_ch, 8, 8)
    t = torch.tensor([0, 7, 19])
    y = torch.tensor([0, 4, 9]) % model.num_class
    with torch.no_grad():
        c1, u1 = guided_eps(model, x, t, y, 1.5, "cfg")
        c2, u2 = batched_guided_eps(model, x, t, y, 1.5, "cfg")
    # a 2B convolution sums in another order than two B ones: rounding-level differences only
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u2, u1, rtol=1e-5, atol=1e-5)


def test_sampler_batches_guidance_by_default_and_matches_the_unbatched_sampler():
    model = tiny_unet(cond=True)
    schedule = Schedule(T=20)
    y = class_balanced_labels(1, model.num_class)
    x_T = torch.randn(len(y), model.in_ch, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    a = ddpm_sample(model, schedule, x_T, y, omega=1.5, generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert set(calls) == {2 * len(y)} and len(calls) == schedule.T  # one 2B forward per step
    b = ddpm_sample(model, schedule, x_T, y, omega=1.5, generator=torch.Generator().manual_seed(1),
                    batch_guidance=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
