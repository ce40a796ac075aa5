"""What the three sampling-step ops (ddpm_step, ddim_step, dpm_step) promise alike: exported from
cbdm_fast.ops with their references, a backend name checked, and the extension refused by name under
CBDM_FAST_NO_EXT while "auto" falls back to the torch reference with the same result. Each op's own
numerics, layouts and errors are in test_<op>.py."""
import pytest
import torch

from cbdm_fast import ops
from cbdm_fast.samplers.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps
from cbdm_fast.schedule import Schedule

T = 1000


def _ddpm_args():
    x_t, eps_c, eps_u, noise = (torch.randn(3, 2, 5) for _ in range(4))
    return dict(x_t=x_t, eps_c=eps_c, eps_u=eps_u, t=torch.tensor([0, 10, 999]), noise=noise,
                table=Schedule(T).sampling_table("fixedlarge"))


def _ddim_args():
    x_t, eps_c, eps_u, noise = (torch.randn(3, 2, 5) for _ in range(4))
    return dict(x_t=x_t, eps_c=eps_c, eps_u=eps_u, t=torch.tensor([0, 10, 999]), t_prev=torch.tensor([-1, 5, 900]),
                noise=noise, alphas_bar=Schedule(T).alphas_bar.float(), eta=0.5)


def _dpm_args():
    schedule = Schedule(T)
    coefs = dpm_solver_coefficients(schedule, dpm_solver_timesteps(schedule, 12), omega=1.6).float()
    x, eps_c, eps_u, x0_prev = (torch.randn(3, 2, 5) for _ in range(4))
    return dict(x=x, eps_c=eps_c, eps_u=eps_u, x0_prev=x0_prev, coefs=coefs, step=torch.tensor([1]))


def _result(name, out, args):
    """ddpm/ddim return x_prev; dpm_step updates x and x0_prev in place."""
    return (args["x"], args["x0_prev"]) if name == "dpm_step" else (out,)


STEPS = {"ddpm_step": _ddpm_args, "ddim_step": _ddim_args, "dpm_step": _dpm_args}


@pytest.mark.parametrize("name", STEPS)
def test_exported_with_its_reference(name):
    assert name in ops.__all__ and f"{name}_reference" in ops.__all__
    assert callable(getattr(ops, name)) and callable(getattr(ops, f"{name}_reference"))


@pytest.mark.parametrize("name", STEPS)
def test_an_unknown_backend_is_named(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        getattr(ops, name)(**STEPS[name](), backend="cuda")


@pytest.mark.parametrize("name", STEPS)
def test_no_ext_env_refuses_the_extension_and_auto_falls_back_to_the_reference(name, monkeypatch):
    monkeypatch.setenv("CBDM_FAST_NO_EXT", "1")
    assert not ops.extension_available()
    op = getattr(ops, name)
    with pytest.raises(RuntimeError, match="CBDM_FAST_NO_EXT"):
        op(**STEPS[name](), backend="extension")
    torch.manual_seed(0)
    auto_args = STEPS[name]()
    ref_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in auto_args.items()}
    auto = _result(name, op(**auto_args), auto_args)
    ref = _result(name, op(**ref_args, backend="reference"), ref_args)
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)
