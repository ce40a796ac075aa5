"""UNet input validation and configuration errors: clear ValueErrors, never a crash deep in torch."""
import pytest
import torch

from cbdm_fast.model import UNet


@pytest.fixture(scope="module")
def small():
    return UNet(T=100, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, num_class=10, in_ch=1).eval()


def _inputs(B=2):
    return torch.randn(B, 1, 8, 8), torch.randint(100, (B,)), torch.randint(10, (B,))


@pytest.mark.parametrize("bad", [10, -1, 1000])
def test_label_out_of_range_is_rejected(small, bad):
    x, t, y = _inputs()
    y[1] = bad
    with pytest.raises(ValueError, match=f"label {bad} out of range.*num_class=10"):
        small(x, t, y)


@pytest.mark.parametrize("bad", [100, -1])
def test_timestep_out_of_range_is_rejected(small, bad):
    x, t, y = _inputs()
    t[0] = bad
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 100\)"):
        small(x, t, y)


@pytest.mark.parametrize("make,needle", [
    (lambda x, t, y: (x[:, :, :7], t, y), "multiples of 2"),
    (lambda x, t, y: (x.repeat(1, 3, 1, 1), t, y), r"shape \(B, 1, H, W\)"),
    (lambda x, t, y: (x, t[:1], y), "t must be an integer tensor of shape"),
    (lambda x, t, y: (x, t.float(), y), "t must be an integer tensor"),
    (lambda x, t, y: (x, t, y.float()), "y must be an integer tensor"),
    (lambda x, t, y: (x, t, y[:1]), "y must be an integer tensor of shape"),
])
def test_wrong_shapes_and_dtypes_are_rejected(small, make, needle):
    with pytest.raises(ValueError, match=needle):
        small(*make(*_inputs()))


def test_y_mask_zero_equals_unconditional(small):
    x, t, y = _inputs(3)
    with torch.no_grad():
        masked = small(x, t, y, y_mask=torch.tensor([1.0, 0.0, 1.0]))
        uncond = small(x, t, None)
        cond = small(x, t, y)
    assert torch.equal(masked[1], uncond[1])
    assert torch.equal(masked[0], cond[0]) and torch.equal(masked[2], cond[2])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ch=48), "multiple of 32"),
    (dict(attn=(2,)), "attn levels"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_configuration_is_rejected(kwargs, needle):
    base = dict(T=100, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, num_class=10)
    with pytest.raises(ValueError, match=needle):
        UNet(**{**base, **kwargs})
