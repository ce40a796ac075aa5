"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2) with classifier-free guidance: the reference sampler, its time grids
and its per-step coefficients.

Notation of the discrete VP schedule (Schedule, integer t in [0, T-1]):
    alpha_t = sqrt(alphas_bar[t]),  sigma_t = sqrt(1 - alphas_bar[t]),  lambda_t = log(alpha_t / sigma_t)
The solver integrates the probability-flow ODE from t_0 = T-1 to t_M = 0 in M model evaluations and
returns x at t = 0, as the official DPM-Solver does for discrete-time models (no extra denoising step).
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, get_args

import torch

from .. import ops
from ..schedule import Schedule
from .guidance import batched_guided_eps, check_labels, guided_eps, is_guided, takes_label_mask

Spacing = Literal["time", "logsnr"]
SPACINGS: tuple = get_args(Spacing)  # grid points uniform in t, or uniform in lambda (log-SNR / 2)
DEFAULT_STEPS = 20                   # model evaluations when none are asked for (at most T - 1)
LOWER_ORDER_BELOW = 15               # fewer steps than this: the last step is first order (as DPM-Solver)


def log_snr(schedule: Schedule) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = log(alphas_bar / (1 - alphas_bar)) / 2, (T,) float64 on the CPU."""
    ab = schedule.alphas_bar.detach().double().cpu()
    return 0.5 * torch.log(ab / (1.0 - ab))


def _logsnr_grid(lam: torch.Tensor, steps: int) -> list:
    """The integer t whose lambda_t is nearest to each of steps + 1 points uniform in [lambda_{T-1}, lambda_0]."""
    T = lam.shape[0]
    targets = torch.linspace(float(lam[T - 1]), float(lam[0]), steps + 1, dtype=torch.float64)
    return (lam.view(1, -1) - targets.view(-1, 1)).abs().argmin(dim=1).tolist()


def max_logsnr_steps(schedule: Schedule) -> int:
    """The largest M whose logSNR grid has M + 1 distinct timesteps (37 for the default T = 1000 schedule:
    lambda falls steeply over the first few t, so finer grids put several points on one integer t)."""
    lam = log_snr(schedule)
    M = 1
    while M + 1 < schedule.T and len(set(_logsnr_grid(lam, M + 1))) == M + 2:
        M += 1
    return M


def default_spacing(schedule: Schedule, steps: int) -> str:
    """logsnr when its grid holds ``steps`` distinct timesteps, else time. Measured on digits-LT
    (bench/results/sampler_study_pc50.md) and on the closed-form tests: at 10-20 steps the time grid's last step
    spans a large log-SNR range (lambda rises by 2.9 from t = 50 to t = 0 at 20 steps) that the
    second-order update extrapolates badly; the logSNR grid keeps every step of the same length."""
    return "logsnr" if steps <= max_logsnr_steps(schedule) else "time"


def dpm_solver_timesteps(schedule: Schedule, steps: int, spacing: str = "time") -> list:
    """The M + 1 = steps + 1 grid points t_0 = T-1 > t_1 > ... > t_M = 0 (distinct integers).

    time:   t_i = round((T-1) (M - i) / M), for 1 <= M <= T-1.
    logsnr: lambda uniform in [lambda_{T-1}, lambda_0], each point mapped to the t of nearest lambda; a
            ValueError naming the largest M this schedule allows when two points land on one t.
    """
    T = schedule.T
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T - 1:
        raise ValueError(f"steps must be an integer in [1, T-1] = [1, {T - 1}] for dpm++2m (a grid of steps + 1 "
                         f"distinct timesteps), got {steps!r}")
    if spacing == "time":
        return [round((T - 1) * (steps - i) / steps) for i in range(steps + 1)]
    ts = _logsnr_grid(log_snr(schedule), steps)
    if len(set(ts)) != steps + 1:
        raise ValueError(f"steps={steps} is too many for the logsnr spacing of this schedule: at most "
                         f"{max_logsnr_steps(schedule)} steps give distinct timesteps (the time spacing allows "
                         f"up to T-1 = {T - 1})")
    return ts


def dpm_solver_coefficients(schedule: Schedule, timesteps: list, omega: float = 0.0,
                            lower_order_final: bool = True) -> torch.Tensor:
    """(M, 6) float64 table, row i = step t_i -> t_{i+1}: (omega, 1/alpha_s, sigma_s/alpha_s, a, b, c).

    With h = lambda_t - lambda_s and r = h_prev / h (Algorithm 2; s = t_i, t = t_{i+1}):
        x0    = (x - sigma_s eps) / alpha_s = x / alpha_s - (sigma_s / alpha_s) eps
        x_new = a x + b x0 + c x0_prev,  a = sigma_t / sigma_s,  e = -alpha_t (exp(-h) - 1)
        first order (DDIM; the first step, and with lower_order_final the last when M < 15):  b = e,  c = 0
        second order, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev:           b = e (1 + 1/(2r)),  c = -e / (2r)
    Column 0 is the guidance strength (read only when the step is guided).
    """
    ab = schedule.alphas_bar.detach().double().cpu()
    alpha, sigma, lam = ab.sqrt(), (1.0 - ab).sqrt(), log_snr(schedule)
    M = len(timesteps) - 1
    rows, h_prev = [], None
    for i, (s, t) in enumerate(zip(timesteps, timesteps[1:])):
        h = float(lam[t] - lam[s])
        e = -float(alpha[t]) * torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()
        if h_prev is None or (lower_order_final and i == M - 1 and M < LOWER_ORDER_BELOW):
            b, c = e, 0.0
        else:
            r = h_prev / h
            b, c = e * (1.0 + 0.5 / r), -e * 0.5 / r
        rows.append([float(omega), float(1.0 / alpha[s]), float(sigma[s] / alpha[s]), float(sigma[t] / sigma[s]), b, c])
        h_prev = h
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def dpm_solver_sample(model, schedule: Schedule, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
                      omega: float = 0.0, method: str = "cfg", steps: Optional[int] = None,
                      spacing: Optional[str] = None,
                      clip_x0: bool = False, lower_order_final: bool = True, backend: str = "auto",
                      progress: Optional[Callable[[int], None]] = None,
                      batch_guidance: Optional[bool] = None) -> torch.Tensor:
    """Sample x_0 from x_T (taken as x at t = T-1) in ``steps`` model evaluations (default 20, at most
    T-1); returns x at t = 0 clipped to [-1, 1] (float32). Deterministic: no noise after x_T.

    spacing: 'time' or 'logsnr' (dpm_solver_timesteps); None: default_spacing. Guidance is applied to eps before the x0
    conversion; clip_x0 clips that x0 to [-1, 1]. lower_order_final: a first-order last step when
    steps < 15 (DPM-Solver's default, which keeps few-step runs stable). method, omega, backend (the step op's) and
    batch_guidance as in ``ddpm_sample``; backend='reference' with batch_guidance=False is the reference
    the fast sampler is tested against.
    """
    check_labels(model, x_T, y, method)
    eps_of = batched_guided_eps if takes_label_mask(model, batch_guidance) else guided_eps
    steps = min(DEFAULT_STEPS, schedule.T - 1) if steps is None else steps
    ts = dpm_solver_timesteps(schedule, steps, spacing or default_spacing(schedule, steps))
    coefs = dpm_solver_coefficients(schedule, ts, omega if is_guided(method, omega) else 0.0, lower_order_final)
    coefs = coefs.float().to(x_T.device)

    x = x_T.float().clone()                       # x_{t_0} = x_T
    x0_prev = torch.zeros_like(x)                 # the previous step's x0 (not read at the first step)
    k = torch.zeros(1, dtype=torch.int64, device=x.device)  # row of the coefficient table
    for s in ts[:-1]:                             # for i = 1..M: s = t_{i-1} -> t = t_i
        t = torch.full((x.shape[0],), s, dtype=torch.long, device=x.device)
        eps_c, eps_u = eps_of(model, x, t, y, omega, method)  # one guided model evaluation at s
        # eps = eps_c + omega (eps_c - eps_u);  x0 = (x - sigma_s eps) / alpha_s  (clipped if clip_x0)
        # x = (sigma_t / sigma_s) x - alpha_t (exp(-h) - 1) D,  D = x0 (first order) or
        #     (1 + 1/(2r)) x0 - 1/(2r) x0_prev (second order); then x0_prev = x0 (in place, row k)
        ops.dpm_step(x, eps_c.float(), None if eps_u is None else eps_u.float(), x0_prev, coefs, k,
                     clip_x0=clip_x0, backend=backend)
        k += 1
        if progress is not None:
            progress(s)
    return x.clamp(-1.0, 1.0)                     # x_{t_M}, t_M = 0
