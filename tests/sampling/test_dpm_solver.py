"""DPM-Solver++(2M) (samplers/dpm_solver.py): convergence at second order against the exact probability-flow
ODE solution, its grids and coefficients, and the sampler plumbing (one 2B forward per step, the op).

The convergence problems have an exact noise predictor (no trained model): data x_0 ~ N(mu, s^2) per
element, or a two-Gaussian mixture (exact eps from the posterior responsibilities). For the Gaussian the
PF-ODE keeps z = (x - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant (closed form); for the
mixture the reference solution is RK4 in lambda with 4000 steps on d(x / sigma)/d lambda = e^lambda x0(x)
(checked against the closed form on the Gaussian). Errors are the max over x_T in [-0.9, 0.9], where the
final clip to [-1, 1] never binds.

Measured slopes (T = 1000, the default schedule): time grid, M = 10, 20, 40, 80, lower_order_final off
(with it, M = 10 ends on a first-order step): 1.77-2.06; DDIM on the same problems: 1.01-1.02. The logSNR
grid cannot reach M = 40 on this schedule (at most 37 distinct integer timesteps: lambda falls by 0.35
between t = 0 and t = 1), so it is fitted over M = 5, 10, 20, 37 (lower_order_final on): 1.63-1.74; its
points crowd onto neighbouring integers near t = 0, which is why its slope sits below 2.
"""
import math

import pytest
import torch

from cbdm_fast.model import UNet
from cbdm_fast.samplers import FastSampler, ReferenceSampler, ddim_sample, dpm_solver_sample, make_sampler
from cbdm_fast.samplers.dpm_solver import (dpm_solver_coefficients, dpm_solver_timesteps, log_snr,
                                           max_logsnr_steps)
from cbdm_fast.schedule import Schedule

T = 1000
SCHEDULE = Schedule(T)
AB = SCHEDULE.alphas_bar.double()
X_T = torch.linspace(-0.9, 0.9, 181).view(-1, 1, 1, 1)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class ExactEps(torch.nn.Module):
    """eps*(x, t) of data whose elements are i.i.d. sum_k N(mu_k, s^2) / K (a conditional "model" when
    ``cond_mus`` is given: label y uses those means, no label the others)."""

    def __init__(self, mus, s, cond_mus=None):
        super().__init__()
        self.mus, self.s = torch.tensor(mus, dtype=torch.float64), s
        self.cond_mus = None if cond_mus is None else torch.tensor(cond_mus, dtype=torch.float64)
        self.label_embedding = None if cond_mus is None else torch.nn.Embedding(1, 1)  # marks it conditional
        self.augm_embedding = None
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter: the samplers read its device
        self.calls = []

    def forward(self, x, t, y=None, augm=None):
        self.calls.append(x.shape[0])
        mus = self.mus if y is None else self.cond_mus
        a, sg = AB[t].sqrt().view(-1, 1, 1, 1, 1), (1 - AB[t]).sqrt().view(-1, 1, 1, 1, 1)
        var = a * a * self.s ** 2 + sg * sg
        d = x.double().unsqueeze(-1) - a * mus                   # (B, C, H, W, K)
        resp = torch.softmax(-d * d / (2 * var), dim=-1)          # posterior responsibilities
        return (sg[..., 0] * (resp * d / var).sum(-1)).to(x.dtype)

    def x0(self, x, lam):
        """E[x_0 | x] at log-SNR lam (float64)."""
        a2 = torch.sigmoid(2 * lam)  # alpha^2; sigma^2 = sigmoid(-2 lam) (no cancellation in 1 - alpha^2)
        a, var = a2.sqrt(), a2 * self.s ** 2 + torch.sigmoid(-2 * lam)
        d = x.unsqueeze(-1) - a * self.mus
        resp = torch.softmax(-d * d / (2 * var), dim=-1)
        return (resp * (self.mus + a * self.s ** 2 / var * d)).sum(-1)


def ode_solution(model, x, lam0: float, lam1: float, n: int = 4000):
    """RK4 in lambda on y = x / sigma: dy/dlambda = e^lambda x0(sigma y, lambda) (DPM-Solver++'s eq. 8)."""
    sigma = lambda lam: torch.sigmoid(-2 * lam).sqrt()  # noqa: E731
    f = lambda y, lam: torch.exp(lam) * model.x0(sigma(lam) * y, lam)  # noqa: E731
    lam, h = torch.tensor(lam0, dtype=torch.float64), (lam1 - lam0) / n
    y = x.double() / sigma(lam)
    for _ in range(n):
        k1 = f(y, lam)
        k2 = f(y + h / 2 * k1, lam + h / 2)
        k3 = f(y + h / 2 * k2, lam + h / 2)
        k4 = f(y + h * k3, lam + h)
        y, lam = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
    return sigma(lam) * y


def gaussian_solution(mu, s, x_T, ab_end: float):
    """x at alphas_bar = ab_end from x_T at t = T-1: z stays constant along the PF-ODE."""
    a, sg = AB[T - 1].sqrt(), (1 - AB[T - 1]).sqrt()
    z = (x_T.double() - a * mu) / torch.sqrt(a * a * s * s + sg * sg)
    a0, s0 = math.sqrt(ab_end), math.sqrt(1 - ab_end)
    return a0 * mu + math.sqrt(a0 * a0 * s * s + s0 * s0) * z


def fitted_slope(steps, errors) -> float:
    """-d log(error) / d log(M), least squares."""
    lm, le = [math.log(m) for m in steps], [math.log(e) for e in errors]
    mx, my = sum(lm) / len(lm), sum(le) / len(le)
    return -sum((a - mx) * (b - my) for a, b in zip(lm, le)) / sum((a - mx) ** 2 for a in lm)


LAM = log_snr(SCHEDULE)
PROBLEMS = {"gaussian": ([0.0], 1.0), "mixture": ([-0.5, 0.5], 0.5)}


@pytest.fixture(scope="module")
def exact():
    """problem -> (model, x at t = 0, x at alphas_bar = 1 (DDIM's end)) by the RK4 reference."""
    out = {}
    for name, (mus, s) in PROBLEMS.items():
        model = ExactEps(mus, s)
        out[name] = (model, ode_solution(model, X_T, float(LAM[T - 1]), float(LAM[0])),
                     ode_solution(model, X_T, float(LAM[T - 1]), 12.0))  # sigma = 6e-6: alphas_bar 1 to 4e-11
    return out


def test_the_rk4_reference_is_the_closed_form_on_the_gaussian(exact):
    model, at0, at1 = exact["gaussian"]
    torch.testing.assert_close(at0, gaussian_solution(0.0, 1.0, X_T, float(AB[0])), rtol=0, atol=1e-9)
    torch.testing.assert_close(at1, gaussian_solution(0.0, 1.0, X_T, 1.0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("spacing,steps,lower_order_final", [("time", (10, 20, 40, 80), False),
                                                              ("logsnr", (5, 10, 20, 37), True)])
def test_error_falls_at_second_order_where_ddim_falls_at_first(exact, problem, spacing, steps, lower_order_final):
    model, at0, at1 = exact[problem]
    errors = [(dpm_solver_sample(model, SCHEDULE, X_T, None, method="uncond", steps=m, spacing=spacing,
                                 lower_order_final=lower_order_final).double() - at0).abs().max().item()
              for m in steps]
    slope = fitted_slope(steps, errors)
    assert 1.5 < slope < 2.6, (errors, slope)
    ddim_steps = (10, 20, 40, 80)
    ddim_errors = [(ddim_sample(model, SCHEDULE, X_T, None, method="uncond", steps=m).double() - at1).abs().max().item()
                   for m in ddim_steps]
    assert 0.8 < fitted_slope(ddim_steps, ddim_errors) < 1.2, ddim_errors
    assert errors[-1] < ddim_errors[ddim_steps.index(40)]  # DPM-Solver++ at <= 40 steps beats DDIM at 40


def test_guidance_is_applied_to_eps_before_the_x0_prediction():
    """Gaussians of one variance: the guided eps (1 + w) eps_c - w eps_u is the exact eps of the Gaussian of
    mean (1 + w) mu_c - w mu_u, so the guided solve must converge to that Gaussian's solution."""
    w, mu_c, mu_u, s = 1.5, 0.2, -0.1, 0.3
    model = ExactEps([mu_u], s, cond_mus=[mu_c])
    want = gaussian_solution((1 + w) * mu_c - w * mu_u, s, X_T, float(AB[0]))
    y = torch.zeros(X_T.shape[0], dtype=torch.int64)
    errors = [(dpm_solver_sample(model, SCHEDULE, X_T, y, omega=w, steps=m, spacing="time").double() - want)
              .abs().max().item() for m in (20, 40, 80)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.02, errors
    model.calls.clear()
    dpm_solver_sample(model, SCHEDULE, X_T, y, omega=w, steps=20, batch_guidance=False)
    assert model.calls == [X_T.shape[0]] * 40  # the authors' two forwards per step


# ---------------------------------------------------------------- grids and coefficients

def test_time_grid_is_uniform_in_t_from_T_minus_1_to_0():
    assert dpm_solver_timesteps(SCHEDULE, 1) == [999, 0]
    assert dpm_solver_timesteps(SCHEDULE, 3) == [999, 666, 333, 0]
    ts = dpm_solver_timesteps(SCHEDULE, 999)
    assert ts == list(range(999, -1, -1))
    ts = dpm_solver_timesteps(SCHEDULE, 20)
    assert len(ts) == 21 and ts[0] == 999 and ts[-1] == 0
    assert max(a - b for a, b in zip(ts, ts[1:])) - min(a - b for a, b in zip(ts, ts[1:])) <= 1


def test_logsnr_grid_is_uniform_in_lambda_and_bounded():
    ts = dpm_solver_timesteps(SCHEDULE, 10, "logsnr")
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True) and len(ts) == 11
    lam = [float(LAM[t]) for t in ts]
    spacing = (lam[-1] - lam[0]) / 10
    assert all(abs(b - a - spacing) < 0.25 * spacing for a, b in zip(lam, lam[1:]))  # nearest integer t
    assert max_logsnr_steps(SCHEDULE) == 37
    assert len(set(dpm_solver_timesteps(SCHEDULE, 37, "logsnr"))) == 38
    with pytest.raises(ValueError, match="at most 37 steps"):
        dpm_solver_timesteps(SCHEDULE, 38, "logsnr")


def test_default_spacing_is_logsnr_where_its_grid_fits():
    from cbdm_fast.samplers.dpm_solver import default_spacing

    assert [default_spacing(SCHEDULE, m) for m in (1, 20, 37, 38, 999)] == ["logsnr"] * 3 + ["time"] * 2
    model = ExactEps([0.0], 1.0)
    torch.testing.assert_close(dpm_solver_sample(model, SCHEDULE, X_T, None, method="uncond", steps=20),
                               dpm_solver_sample(model, SCHEDULE, X_T, None, method="uncond", steps=20,
                                                 spacing="logsnr"), rtol=0, atol=0)


@pytest.mark.parametrize("steps,spacing,message", [
    (0, "time", r"steps must be an integer in \[1, T-1\] = \[1, 999\]"),
    (1000, "time", r"\[1, 999\].*got 1000"),
    (2.5, "time", "steps must be an integer"),
    (10, "uniform", "spacing must be one of"),
])
def test_grid_errors_name_the_argument(steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        dpm_solver_timesteps(SCHEDULE, steps, spacing)


def test_coefficients_are_algorithm_2():
    ts = dpm_solver_timesteps(SCHEDULE, 20)
    table = dpm_solver_coefficients(SCHEDULE, ts, omega=1.5)
    assert table.shape == (20, 6) and table.dtype == torch.float64 and (table[:, 0] == 1.5).all()
    lam = [float(LAM[t]) for t in ts]
    h = [b - a for a, b in zip(lam, lam[1:])]
    for i, (s, t) in enumerate(zip(ts, ts[1:])):
        a_s, a_t, s_s, s_t = AB[s].sqrt(), AB[t].sqrt(), (1 - AB[s]).sqrt(), (1 - AB[t]).sqrt()
        e = -a_t * (math.exp(-h[i]) - 1)
        want = [1 / a_s, s_s / a_s, s_t / s_s]
        if i == 0:  # first order: D = x0
            want += [e, 0.0]
        else:       # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_{i-1} / h_i
            r = h[i - 1] / h[i]
            want += [e * (1 + 1 / (2 * r)), -e / (2 * r)]
        torch.testing.assert_close(table[i, 1:], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    short = dpm_solver_coefficients(SCHEDULE, dpm_solver_timesteps(SCHEDULE, 10))
    assert short[-1, 5] == 0 and short[-2, 5] != 0  # lower order at the final step below 15 steps
    assert dpm_solver_coefficients(SCHEDULE, dpm_solver_timesteps(SCHEDULE, 10), lower_order_final=False)[-1, 5] != 0


def test_one_step_is_ddim():
    """First-order DPM-Solver++ is DDIM: one step from T-1 to 0 equals DDIM's step T-1 -> 0 on the same eps."""
    from cbdm_fast import ops

    model = ExactEps([0.1], 0.6)
    x = torch.randn(4, 1, 3, 3)
    got = dpm_solver_sample(model, SCHEDULE, x, None, method="uncond", steps=1)
    eps = model(x, torch.full((4,), T - 1))
    want = ops.ddim_step(x, eps, None, torch.full((4,), T - 1), torch.zeros(4, dtype=torch.int64), None,
                         SCHEDULE.alphas_bar.float())
    # float32 rounding of x0 = x / alpha_s - ...: alpha_{999} = 0.0064 amplifies it 150 times
    torch.testing.assert_close(got, want.clamp(-1, 1), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the samplers of global indices

@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet(T=50, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, cond=True, num_class=4,
                 in_ch=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_fast_sampler_runs_one_2b_forward_and_the_op_per_step(unet, monkeypatch):
    from cbdm_fast import ops

    calls, steps, seen = [], [], []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    real = ops.dpm_step
    monkeypatch.setattr(ops, "dpm_step", lambda *a, **k: steps.append(int(a[5])) or real(*a, **k))
    try:
        FastSampler(unet, Schedule(50), (3, 8, 8), sampler="dpm++2m", steps=7, omega=2.0)(
            torch.tensor([1, 2, 3]), torch.arange(3), progress=seen.append)
    finally:
        handle.remove()
    # 7 steps fit the logSNR grid of T = 50 (at most 7): the default spacing
    assert calls == [6] * 7 and steps == list(range(7)) and seen == dpm_solver_timesteps(Schedule(50), 7, "logsnr")[:-1]


@pytest.mark.parametrize("kw", [dict(steps=10), dict(steps=7, spacing="logsnr"), dict(steps=16, clip_x0=True),
                                dict(steps=5, method="cond"), dict(steps=5, method="uncond")])
def test_fast_sampler_equals_the_reference_whatever_the_batch(unet, kw):
    """Batches of 2 and 5 on the fast sampler and the reference (two forwards, the torch step): the same
    images to rounding (the tolerance of the other samplers' test in test_samplers.py)."""
    schedule = Schedule(50)
    y = None if kw.get("method") == "uncond" else torch.tensor([0, 1, 2, 3, 1])
    args = dict(seed=3, sampler="dpm++2m", omega=1.5, **kw)
    fast = make_sampler("fast", unet, schedule, (3, 8, 8), **args)
    ref = make_sampler("reference", unet, schedule, (3, 8, 8), **args)
    idx = torch.arange(5)
    a = torch.cat([fast(None if y is None else y[i:i + 2], idx[i:i + 2]) for i in range(0, 5, 2)])
    torch.testing.assert_close(a, fast(y, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(a, ref(y, idx), atol=1e-5, rtol=0)
    assert a.abs().max() <= 1 and a.std() > 0.05
    assert (FastSampler(unet, schedule, (3, 8, 8), **{**args, "seed": 4})(y, idx) - a).abs().max() > 1e-2


def test_sampler_option_errors(unet):
    s, shape = Schedule(50), (3, 8, 8)
    with pytest.raises(ValueError, match="spacing applies to the dpm"):
        FastSampler(unet, s, shape, sampler="ddim", steps=5, spacing="time")
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        ReferenceSampler(unet, s, shape, sampler="dpm++2m", eta=0.5)
    with pytest.raises(ValueError, match="at most 7 steps"):
        FastSampler(unet, s, shape, sampler="dpm++2m", steps=8, spacing="logsnr")
    with pytest.raises(ValueError, match=r"\[1, 49\]"):
        ReferenceSampler(unet, s, shape, sampler="dpm++2m", steps=50)
    with pytest.raises(ValueError, match="spacing must be one of"):
        FastSampler(unet, s, shape, sampler="dpm++2m", spacing="karras")


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_and_the_reference(unet):
    """On CUDA: the replayed graph (forward, step from the device table at the device counter, k += 1) equals
    the eager fast path, and fp32 replay the CPU reference."""
    import copy

    schedule = Schedule(50, device="cuda")
    model = copy.deepcopy(unet).cuda()
    y, idx = torch.tensor([0, 1, 2, 3, 1, 2, 0]), torch.arange(7)
    args = dict(seed=3, sampler="dpm++2m", steps=12, omega=1.5)
    graph = FastSampler(model, schedule, (3, 8, 8), cuda_graph=True, **args)
    eager = FastSampler(model, schedule, (3, 8, 8), cuda_graph=False, **args)
    a = torch.cat([graph(y[:4], idx[:4]), graph(y[4:], idx[4:])])  # the second batch replays padded
    torch.testing.assert_close(a[:4], eager(y[:4], idx[:4]), atol=1e-3, rtol=0)
    fp32 = FastSampler(model, schedule, (3, 8, 8), cuda_graph=True, amp=False, **args)(y, idx)
    ref = ReferenceSampler(unet, Schedule(50), (3, 8, 8), **args)(y, idx)
    torch.testing.assert_close(fp32.cpu(), ref, atol=1e-3, rtol=0)
    assert (a.cpu() - ref).abs().mean() < 0.02
