"""The DDPM noise schedule: betas and every coefficient derived from them.

One object serves training (q_sample) and sampling (the posterior coefficients), so both always
use the same numbers. Tables are kept in float64 and gathered then cast to float32, exactly like
the CBDM authors' ``extract`` helper, which keeps x_t bit-identical to their code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VAR_TYPES = ("fixedlarge", "fixedsmall")


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] as float32, shaped (B, 1, 1, ...) to broadcast over a tensor of rank ``ndim``."""
    out = torch.gather(table, index=t, dim=0).float()
    return out.view([t.shape[0]] + [1] * (ndim - 1))


class Schedule:
    """Linear beta schedule of DDPM: beta_t = linspace(beta_1, beta_T, T), alphas_bar = cumprod(1 - beta).

    The linspace is taken in float32 and then widened to float64, as the authors' code does
    (``torch.linspace(beta_1, beta_T, T).double()``); everything after it is float64.
    """

    def __init__(self, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02, device=None):
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"T must be an integer >= 2, got {T!r}")
        if not 0.0 < beta_1 <= beta_T < 1.0:
            raise ValueError(f"need 0 < beta_1 <= beta_T < 1, got beta_1={beta_1}, beta_T={beta_T}")
        self.T, self.beta_1, self.beta_T = T, float(beta_1), float(beta_T)
        betas = torch.linspace(beta_1, beta_T, T).double()
        alphas = 1.0 - betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        alphas_bar_prev = F.pad(alphas_bar, [1, 0], value=1.0)[:T]

        self.betas = betas
        self.alphas_bar = alphas_bar
        # forward process q(x_t | x_0)
        self.sqrt_alphas_bar = torch.sqrt(alphas_bar)
        self.sqrt_one_minus_alphas_bar = torch.sqrt(1.0 - alphas_bar)
        # x_0 from eps: x_0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
        self.sqrt_recip_alphas_bar = torch.sqrt(1.0 / alphas_bar)
        self.sqrt_recipm1_alphas_bar = torch.sqrt(1.0 / alphas_bar - 1.0)
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_var)
        self.posterior_var = betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)
        self.posterior_mean_coef1 = torch.sqrt(alphas_bar_prev) * betas / (1.0 - alphas_bar)
        self.posterior_mean_coef2 = torch.sqrt(alphas) * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)
        if device is not None:
            self._move(torch.device(device))

    def _move(self, device: torch.device) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))

    def to(self, device) -> "Schedule":
        """A copy of this schedule with its tables on ``device``."""
        return Schedule(self.T, self.beta_1, self.beta_T, device=device)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise (float32 coefficients)."""
        if x_0.shape != noise.shape:
            raise ValueError(f"x_0 {tuple(x_0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        if t.ndim != 1 or t.shape[0] != x_0.shape[0]:
            raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
        return (extract(self.sqrt_alphas_bar, t, x_0.ndim) * x_0
                + extract(self.sqrt_one_minus_alphas_bar, t, x_0.ndim) * noise)

    def log_variance(self, var_type: str) -> torch.Tensor:
        """log of the reverse-process variance (float64, length T).

        fixedlarge: [posterior_var[1], betas[1:]]; fixedsmall: posterior_var with its t=0 entry
        (which is 0) replaced by posterior_var[1], as in DDPM.
        """
        if var_type == "fixedlarge":
            return torch.log(torch.cat([self.posterior_var[1:2], self.betas[1:]]))
        if var_type == "fixedsmall":
            return torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")

    def sampling_table(self, var_type: str = "fixedlarge") -> torch.Tensor:
        """The (5, T) float32 table of the ancestral step, rows:
        [sqrt_recip_ab, sqrt_recipm1_ab, coef1, coef2, sigma], sigma = exp(0.5 * log_var) taken in
        float32 as the authors do. Consumed by ``cbdm_fast.ops.ddpm_step``."""
        sigma = torch.exp(0.5 * self.log_variance(var_type).float())
        rows = [self.sqrt_recip_alphas_bar, self.sqrt_recipm1_alphas_bar,
                self.posterior_mean_coef1, self.posterior_mean_coef2]
        return torch.stack([r.float() for r in rows] + [sigma]).contiguous()
