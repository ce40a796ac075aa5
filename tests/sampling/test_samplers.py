"""Samplers: ddpm_sample and ddim_sample (ops.ddpm_step / ops.ddim_step) against the authors' loop
(written out below from the Schedule's float64 tables, independently of the ops), labels, guidance
inputs, and x0 clipping. Tiny UNets (ch 32, 8x8 images, T = 20) so everything runs in seconds on a CPU.

Tolerance of ddpm_sample vs the authors' loop: 1e-5 absolute on images in [-1, 1] (both do the same
float32 operations in the same order with the same noise; the difference is at most rounding).
"""
import pytest
import torch

from cbdm_fast import ops
from cbdm_fast.model import UNet
from cbdm_fast.samplers import class_balanced_labels, ddim_sample, ddpm_sample, guided_eps, uniform_labels
from cbdm_fast.schedule import Schedule, extract

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


@torch.no_grad()
def authors_loop(model, schedule, x_T, y=None, omega=0.0, method="cfg", var_type="fixedlarge", clip_x0=False,
                 generator=None):
    """The authors' GaussianDiffusionSampler step by step in torch, from the Schedule's float64 tables:
    the independent baseline of ddpm_sample (two forwards per step, their order of operations)."""
    log_var = schedule.log_variance(var_type)
    x_t = x_T.float().clone()
    for step in reversed(range(schedule.T)):
        t = torch.full((x_t.shape[0],), step, dtype=torch.long)
        eps, eps_u = guided_eps(model, x_t, t, y, omega, method)
        if eps_u is not None:
            eps = eps + omega * (eps - eps_u)
        x_0 = (extract(schedule.sqrt_recip_alphas_bar, t, x_t.ndim) * x_t
               - extract(schedule.sqrt_recipm1_alphas_bar, t, x_t.ndim) * eps)
        if clip_x0:
            x_0 = x_0.clamp(-1.0, 1.0)
        mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x_0
                + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
        noise = 0 if step == 0 else torch.randn(x_t.shape, generator=generator)
        x_t = mean + torch.exp(0.5 * extract(log_var, t, x_t.ndim)) * noise
    return x_t.clamp(-1.0, 1.0)


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
        _REFERENCE[key] = authors_loop(cond_model, schedule, x_T, y, generator=g1, **kw)
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


@pytest.mark.parametrize("method", ["cfg", "uncond"])
def test_reference_configuration_is_the_authors_loop_bit_for_bit(cond_model, method):
    """backend='reference' with two forwards (what ReferenceSampler runs) IS the authors' loop."""
    schedule = Schedule(T)
    y = torch.tensor([0, 1, 2, 3, 1])
    x_T, g = x_T_and_gen()
    ref = ddpm_sample(cond_model, schedule, x_T, y, omega=1.6, method=method, generator=g, backend="reference",
                      batch_guidance=False)
    x_T, g = x_T_and_gen()
    assert torch.equal(ref, authors_loop(cond_model, schedule, x_T, y, omega=1.6, method=method, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_matches_its_reference_configuration(cond_model, backend, eta):
    """ddim_sample's defaults (one 2B forward, the op's backend) against backend='reference' with the
    authors' two forwards, over a 6-step sub-sequence."""
    schedule = Schedule(T)
    y = torch.tensor([0, 1, 2, 3, 1])
    kw = dict(omega=1.6, steps=6, eta=eta)
    x_T, g = x_T_and_gen()
    ref = ddim_sample(cond_model, schedule, x_T, y, generator=g, backend="reference", batch_guidance=False, **kw)
    x_T, g = x_T_and_gen()
    seen = []
    out = ddim_sample(cond_model, schedule, x_T, y, generator=g, backend=backend, progress=seen.append, **kw)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert seen == [19, 15, 11, 8, 4, 0] and out.abs().max() <= 1.0


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
            ddim_sample(cond_model, schedule, x_T, None, omega=1.0, method=method)
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
    # and the authors' loop agrees on both
    x, g = x_T_and_gen()
    torch.testing.assert_close(authors_loop(model, schedule, x, y, method="cond", generator=g), default,
                               atol=ATOL, rtol=0)
    x, g = x_T_and_gen()
    torch.testing.assert_close(authors_loop(model, schedule, x, y, method="cond", clip_x0=True, generator=g),
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
    from cbdm_fast.samplers.guidance import takes_label_mask

    model = tiny_unet(cond=True)
    schedule = Schedule(T=20)
    y = class_balanced_labels(1, model.num_class)
    x_T = torch.randn(len(y), model.in_ch, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    a = ddpm_sample(model, schedule, x_T, y, omega=1.5, generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert set(calls) == {2 * len(y)} and len(calls) == schedule.T  # one 2B forward per step
    # decided by the model's declaration (UNet.takes_label_mask) or an explicit batch_guidance
    assert takes_label_mask(model) and not takes_label_mask(model, batch_guidance=False)
    assert not takes_label_mask(torch.nn.Linear(1, 1)) and takes_label_mask(torch.nn.Linear(1, 1), True)
    b = ddpm_sample(model, schedule, x_T, y, omega=1.5, generator=torch.Generator().manual_seed(1),
                    batch_guidance=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- per-sample counter noise, DDIM, fast vs reference
from cbdm_fast.samplers import (CounterNoise, FastSampler, ReferenceSampler, ddim_timesteps,  # noqa: E402
                                make_sampler, timestep_pairs)
from cbdm_fast.samplers.noise import _GAMMA, PAIR_BITS, SAMPLE_BITS, mix64_py, noise_key  # noqa: E402

MASK64 = (1 << 64) - 1


def counter_bits_py(seed: int, sample: int, draw: int, pair: int) -> int:
    """The 64 random bits of one element pair, in pure Python: CounterNoise's design written out."""
    position = (draw << (SAMPLE_BITS + PAIR_BITS)) | (sample << PAIR_BITS) | pair
    return mix64_py(position * _GAMMA + noise_key(seed))


def test_counter_noise_bits_match_the_python_reference():
    noise = CounterNoise(12345, (3, 2, 3))  # 18 elements: 9 pairs
    index = torch.tensor([0, 7, 2 ** 26 - 1])
    for draw in (0, 1, 999, 2 ** 16 - 1):
        bits = noise.bits(index, draw)
        assert bits.shape == (3, 9)
        for r, i in enumerate(index.tolist()):
            for p in range(9):
                assert int(bits[r, p]) & MASK64 == counter_bits_py(12345, i, draw, p), (i, draw, p)
    # a device tensor as the draw index (what the CUDA graph feeds) gives the same bits
    assert torch.equal(noise.bits(index, torch.tensor([999])), noise.bits(index, 999))


def test_counter_noise_is_per_sample_and_standard_normal():
    noise = CounterNoise(0, (3, 8, 8))
    a = noise(torch.arange(10), 5)
    b = noise(torch.tensor([7, 3]), 5)
    assert a.dtype == torch.float32 and a.shape == (10, 3, 8, 8)
    assert torch.equal(b, a[[7, 3]])                      # no dependence on the batch
    assert not torch.equal(noise(torch.arange(10), 6), a)  # another draw
    assert not torch.equal(CounterNoise(1, (3, 8, 8))(torch.arange(10), 5), a)  # another seed
    z = CounterNoise(3, (3, 16, 16))(torch.arange(400), 1).flatten().double()  # 307k values
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z ** 3).mean()) < 0.02 and abs((z ** 4).mean() - 3) < 0.05
    odd = CounterNoise(0, (1, 3, 3))(torch.arange(4), 0)  # an odd element count
    assert odd.shape == (4, 1, 3, 3) and torch.isfinite(odd).all()


def test_counter_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        CounterNoise(-1, (3, 8, 8))
    with pytest.raises(ValueError, match="elements"):
        CounterNoise(0, (3, 2048, 2048))
    with pytest.raises(ValueError, match="draw"):
        CounterNoise(0, (3, 8, 8))(torch.arange(2), 2 ** 16)


def test_ddim_timesteps_are_evenly_spaced_and_descending():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = ddim_timesteps(1000, 100)
    assert len(ts) == 100 == len(set(ts)) and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert max(a - b for a, b in zip(ts, ts[1:])) - min(a - b for a, b in zip(ts, ts[1:])) <= 1
    assert ddim_timesteps(20, 1) == [19] and ddim_timesteps(20, 2) == [19, 0]
    assert timestep_pairs("ddim", Schedule(20), 3) == ([19, 10, 0], [10, 0, -1])
    assert timestep_pairs("ddpm", Schedule(5)) == ([4, 3, 2, 1, 0], [3, 2, 1, 0, -1])
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(20, 21)
    with pytest.raises(ValueError, match="ddim"):
        timestep_pairs("ddpm", Schedule(20), 10)


T50 = 50


@pytest.fixture(scope="module")
def model50():
    torch.manual_seed(0)
    model = UNet(T=T50, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, cond=True,
                 num_class=C, in_ch=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _in_batches(sampler, y, batch):
    idx = torch.arange(len(y))
    return torch.cat([sampler(y[i:i + batch], idx[i:i + batch]) for i in range(0, len(y), batch)])


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", dict(steps=T50, eta=0.0)),
                                        ("ddim", dict(steps=10, eta=1.0))])
def test_samples_do_not_depend_on_batch_size_or_backend(model50, sampler, kw):
    """A 50-step run of 5 samples: batch sizes 2 and 5 and both backends give the same images."""
    schedule = Schedule(T50)
    y = torch.tensor([0, 1, 2, 3, 1])
    args = dict(seed=3, sampler=sampler, omega=1.5, **kw)
    fast = FastSampler(model50, schedule, (3, SIZE, SIZE), **args)
    ref = ReferenceSampler(model50, schedule, (3, SIZE, SIZE), **args)
    a, b = _in_batches(fast, y, 2), _in_batches(fast, y, 5)
    c = _in_batches(ref, y, 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert a.abs().max() <= 1 and a.std() > 0.05
    other_seed = FastSampler(model50, schedule, (3, SIZE, SIZE), **{**args, "seed": 4})(y, torch.arange(5))
    assert (other_seed - a).abs().max() > 1e-2


def test_ddim_eta1_over_all_steps_uses_the_ddpm_noise(model50):
    """DDIM with eta 1 and every timestep is DDPM with the fixedsmall variance, noise included."""
    schedule = Schedule(T50)
    y = torch.tensor([0, 3])
    common = dict(seed=1, omega=1.0)
    ddim = FastSampler(model50, schedule, (3, SIZE, SIZE), sampler="ddim", steps=T50, eta=1.0, **common)
    ddpm = FastSampler(model50, schedule, (3, SIZE, SIZE), sampler="ddpm", var_type="fixedsmall", **common)
    torch.testing.assert_close(ddim(y, torch.arange(2)), ddpm(y, torch.arange(2)), atol=2e-4, rtol=0)


def test_fast_sampler_uses_one_2b_forward_and_the_op(model50, monkeypatch):
    from cbdm_fast import ops

    calls, steps = [], []
    handle = model50.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    real = ops.ddim_step
    monkeypatch.setattr(ops, "ddim_step", lambda *a, **k: steps.append(k["backend"]) or real(*a, **k))
    try:
        seen = []
        FastSampler(model50, Schedule(T50), (3, SIZE, SIZE), sampler="ddim", steps=7, omega=2.0)(
            torch.tensor([1, 2, 3]), torch.arange(3), progress=seen.append)
    finally:
        handle.remove()
    assert calls == [6] * 7 and steps == ["auto"] * 7 and seen == ddim_timesteps(T50, 7)


def test_uncond_and_cond_methods_on_both_backends(model50):
    schedule = Schedule(T50)
    for method in ("cond", "uncond"):
        y = None if method == "uncond" else torch.tensor([2, 0])
        outs = [make_sampler(b, model50, schedule, (3, SIZE, SIZE), sampler="ddim", steps=5, method=method)(
            y, torch.arange(2)) for b in ("fast", "reference")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_sampler_argument_errors(model50):
    s = Schedule(T50)
    shape = (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler"):
        FastSampler(model50, s, shape, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="all T"):
        FastSampler(model50, s, shape, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="sampler"):
        FastSampler(model50, s, shape, sampler="plms")
    with pytest.raises(ValueError, match="eta"):
        FastSampler(model50, s, shape, sampler="ddim", steps=5, eta=-1.0)
    with pytest.raises(ValueError, match="eta must be <= 1"):
        FastSampler(model50, s, shape, sampler="ddim", steps=5, eta=1.5)
    with pytest.raises(ValueError, match="cuda_graph"):
        FastSampler(model50, s, shape, cuda_graph=True)
    with pytest.raises(ValueError, match="reference sampler takes no"):
        make_sampler("reference", model50, s, shape, amp=True)
    with pytest.raises(ValueError, match="backend"):
        make_sampler("turbo", model50, s, shape)
    with pytest.raises(ValueError, match="needs labels"):
        FastSampler(model50, s, shape, omega=1.0)(None, torch.arange(2))
    # sample indices outside the counter noise's 26 bits would silently reuse other samples' noise
    for backend in ("fast", "reference"):
        sampler = make_sampler(backend, model50, s, shape, sampler="ddim", steps=2)
        for index in (torch.tensor([0, 2 ** 26]), torch.tensor([-1, 3])):
            with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 67108864\)"):
                sampler(torch.tensor([1, 2]), index)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", dict(steps=20, eta=0.5))])
def test_cuda_graph_replay_matches_eager_and_the_reference(model50, sampler, kw, monkeypatch):
    """On CUDA: graph replay == eager fast path (same kernels), and both near the fp32 reference on CPU
    (bf16 autocast: loose bound). The counter noise is the same on both devices."""
    import copy

    schedule = Schedule(T50, device="cuda")
    model = copy.deepcopy(model50).cuda()
    y = torch.tensor([0, 1, 2, 3, 1, 2, 0])
    idx = torch.arange(7)
    args = dict(seed=3, sampler=sampler, omega=1.5, **kw)
    noise_cpu = CounterNoise(3, (3, SIZE, SIZE))(idx, 7)
    noise_gpu = CounterNoise(3, (3, SIZE, SIZE), "cuda")(idx.cuda(), 7)
    assert torch.equal(CounterNoise(3, (3, SIZE, SIZE)).bits(idx, 7),
                       CounterNoise(3, (3, SIZE, SIZE), "cuda").bits(idx.cuda(), 7).cpu())
    torch.testing.assert_close(noise_gpu.cpu(), noise_cpu, atol=1e-5, rtol=1e-5)
    graph = FastSampler(model, schedule, (3, SIZE, SIZE), cuda_graph=True, **args)
    eager = FastSampler(model, schedule, (3, SIZE, SIZE), cuda_graph=False, **args)
    a = torch.cat([graph(y[:4], idx[:4]), graph(y[4:], idx[4:])])  # the second batch replays padded
    torch.testing.assert_close(a[:4], eager(y[:4], idx[:4]), atol=1e-3, rtol=0)  # same shapes, same kernels
    b = eager(y, idx)  # another batch size: bf16 rounding of other convolution algorithms
    assert (a - b).abs().max() < 0.1 and (a - b).abs().mean() < 5e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 really fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fp32 = FastSampler(model, schedule, (3, SIZE, SIZE), cuda_graph=True, amp=False, **args)(y, idx)
    ref = ReferenceSampler(model50, Schedule(T50), (3, SIZE, SIZE), **args)(y, idx)
    torch.testing.assert_close(fp32.cpu(), ref, atol=1e-3, rtol=0)
    assert (a.cpu() - ref).abs().mean() < 0.02



@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fast_sampler_with_the_fused_modules_matches_the_reference(model50, cuda_graph, monkeypatch):
    """patch=True (fused GroupNorm+SiLU and attention of cbdm_fast.nn), fp32, on CUDA, eager and replayed
    (on CPU the Triton kernels run interpreted: minutes, so this is a GPU test)."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    y = torch.tensor([1, 3])
    args = dict(seed=5, sampler="ddim", steps=6, eta=0.3, omega=1.2)
    patched = FastSampler(copy.deepcopy(model50).cuda(), Schedule(T50, device="cuda"), (3, SIZE, SIZE), patch=True,
                          amp=False, cuda_graph=cuda_graph, **args)
    assert any(type(m).__name__ == "GroupNormSiLU" for m in patched.model.modules())
    ref = ReferenceSampler(model50, Schedule(T50), (3, SIZE, SIZE), **args)
    torch.testing.assert_close(patched(y, torch.arange(2)).cpu(), ref(y, torch.arange(2)), atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_fast_sampler_compiled_matches_the_reference(model50, monkeypatch):
    """compile=True (the UNet under torch.compile, compiled in the warm-up before the graph capture), fp32
    on CUDA, against the fp32 reference on CPU."""
    import copy

    import torch._dynamo

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    y = torch.tensor([1, 3, 0])
    args = dict(seed=5, sampler="ddim", steps=6, eta=0.3, omega=1.2)
    torch._dynamo.reset()
    compiled = FastSampler(copy.deepcopy(model50).cuda(), Schedule(T50, device="cuda"), (3, SIZE, SIZE),
                           compile=True, amp=False, cuda_graph=True, **args)
    ref = ReferenceSampler(model50, Schedule(T50), (3, SIZE, SIZE), **args)
    torch.testing.assert_close(compiled(y, torch.arange(3)).cpu(), ref(y, torch.arange(3)), atol=1e-3, rtol=0)
    torch._dynamo.reset()
