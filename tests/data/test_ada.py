"""ADA as a batched warp (cbdm_fast/data/ada.py) against the authors' Karras pipeline semantics."""
import math

import numpy as np
import pytest
import torch

from cbdm_fast.data.ada import ada_augment, ada_cond, ada_matrices, ada_params, ada_warp

pytestmark = pytest.mark.usefixtures("one_thread")


def params(B=1, **vals):
    """(B, 8) parameters a0..a7, all zero except the named ones (a0=..., a3=...)."""
    a = torch.zeros(B, 8)
    for k, v in vals.items():
        a[:, int(k[1:])] = v
    return a


def image(B=2, C=3, H=12, W=12, seed=0):
    return torch.rand((B, C, H, W), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identity_and_flips_are_exact():
    x = image()
    assert torch.equal(ada_warp(x, ada_matrices(params(2), 12, 12)), x)
    torch.testing.assert_close(ada_warp(x, ada_matrices(params(2, a0=1.0), 12, 12)), x.flip(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(ada_warp(x, ada_matrices(params(2, a1=1.0), 12, 12)), x.flip(2), atol=1e-6, rtol=0)
    # a quarter turn maps the pixel grid onto itself: an exact rotation of the array
    rot = ada_warp(x, ada_matrices(params(2, a3=math.pi / 2), 12, 12))
    assert any(torch.allclose(rot, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))


def test_integer_translation_mirrors_about_the_edge_pixel():
    x = image(B=1, H=8, W=8)
    # tr W a6 = 1 pixel to the right: out[x] = in[x - 1]; column 0 reflects about pixel 0 (numpy "reflect")
    out = ada_warp(x, ada_matrices(params(1, a6=1.0), 8, 8))
    torch.testing.assert_close(out[..., 1:], x[..., :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 0], x[..., 1], atol=1e-5, rtol=0)


def _authors_matrix(a, h, w):
    """Their composition, written out with numpy (translate2d, scale2d, rotate2d as in their file)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = [float(v) for v in a]
    T = lambda tx, ty: np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=np.float64)
    S = lambda sx, sy: np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=np.float64)
    R = lambda t: np.array([[np.cos(t), np.sin(-t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    s = 2 ** 0.2
    mats = [T(h / 2 - 0.5, w / 2 - 0.5), S(1 - 2 * a0, 1), S(1, 1 - 2 * a1), S(s ** a2, s ** a2), R(-a3), R(a4),
            S(s ** a5, s ** -a5), R(-a4), T(w * a6 / 8, h * a7 / 8), T(-h / 2 + 0.5, -w / 2 + 0.5)]
    m = mats[0]
    for n in mats[1:]:
        m = m @ n
    return m


def test_matrices_and_cond_follow_the_authors():
    a = ada_params(64, p=0.9, generator=torch.Generator().manual_seed(1))
    m = ada_matrices(a, 16, 16)
    for i in range(64):
        np.testing.assert_allclose(m[i].double().numpy(), _authors_matrix(a[i], 16, 16), atol=2e-5)
    c = ada_cond(a)
    a0, a1, a2, a3, a4, a5, a6, a7 = a.unbind(1)
    want = torch.stack([a0, a1, a2, a3.cos() - 1, a3.sin(), a5 * a4.cos(), a5 * a4.sin(), a6, a7], 1)
    assert c.shape == (64, 9) and torch.equal(c, want)


def test_probabilities():
    a = ada_params(40000, generator=torch.Generator().manual_seed(2))
    nz = (a != 0).float().mean(0)
    assert abs(nz[0] - 0.5) < 0.01                      # x-flip: every image, half flipped
    assert abs(nz[1] - 0.06) < 0.006                    # y-flip: p * 1/2
    for k in (2, 3, 4, 5, 6, 7):
        assert abs(nz[k] - 0.12) < 0.01, (k, float(nz[k]))
    assert torch.equal(a[:, 4] != 0, a[:, 5] != 0) and torch.equal(a[:, 6] != 0, a[:, 7] != 0)  # shared "do"
    none = ada_params(100, p=0.0, generator=torch.Generator().manual_seed(3))
    assert (none[:, 1:] == 0).all()
    with pytest.raises(ValueError, match=r"ADA probability must be in \[0, 1\]"):
        ada_params(2, p=1.5)


def test_warp_matches_an_order3_spline_warp_on_a_smooth_image():
    """The geometry against scipy's order-3 map_coordinates with mode "mirror" (= numpy/scikit-image
    "reflect", what the authors' warp uses), on a smooth image where the kernels agree closely."""
    from scipy import ndimage

    H = W = 24
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    img = np.sin(xx / 4.0) * np.cos(yy / 5.0) + 0.3 * np.sin((xx + yy) / 7.0)
    a = torch.tensor([[1.0, 0.0, 0.4, 0.5, 1.0, -0.6, 0.3, -0.2]])
    m = ada_matrices(a, H, W)[0].double().numpy()
    inv = np.linalg.inv(m)
    src = inv @ np.stack([xx.ravel(), yy.ravel(), np.ones(H * W)])
    want = ndimage.map_coordinates(img, [src[1], src[0]], order=3, mode="mirror").reshape(H, W)
    got = ada_warp(torch.tensor(img, dtype=torch.float32)[None, None], ada_matrices(a, H, W))[0, 0].numpy()
    assert np.abs(got - want).max() < 0.03
    assert np.abs(got - img).max() > 0.5  # the transform did move the image


def test_augment_on_a_batch_returns_images_and_cond():
    x = image(B=5)
    out, cond = ada_augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and cond.shape == (5, 9)
    with pytest.raises(ValueError, match="float"):
        ada_warp(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ada_matrices(params(2), 4, 4))


def test_rank_parts_of_a_global_batch_equal_the_one_process_augmentation():
    x = image(B=6, seed=3)
    whole, cond = ada_augment(x, p=0.9, generator=torch.Generator().manual_seed(5))
    parts = [ada_augment(x[r * 3:(r + 1) * 3], p=0.9, generator=torch.Generator().manual_seed(5), global_batch=6,
                         part=slice(r * 3, (r + 1) * 3)) for r in range(2)]
    assert torch.equal(torch.cat([o for o, _ in parts]), whole)
    assert torch.equal(torch.cat([c for _, c in parts]), cond)
    with pytest.raises(ValueError, match="global batch of 6 has 3 rows, but x holds 2 images"):
        ada_augment(x[:2], generator=torch.Generator().manual_seed(5), global_batch=6, part=slice(0, 3))


# ------------------------------------------------------------------------------- in training
def test_fused_step_with_augm_matches_the_eager_step():
    import copy

    from cbdm_fast.model import UNet
    from cbdm_fast.schedule import Schedule
    from cbdm_fast.training import Draws, StepConfig, eager_step, fused_step, make_optimizer

    torch.manual_seed(0)
    net = UNet(T=100, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, cond=True, augm=True,
               num_class=10, in_ch=1)
    g = torch.Generator().manual_seed(1)
    x_0 = torch.rand((6, 1, 8, 8), generator=g) * 2 - 1
    x_0, augm = ada_augment(x_0, p=0.9, generator=g)
    y = torch.randint(10, (6,), generator=g)
    d = Draws(torch.randint(100, (6,), generator=g), torch.randn(x_0.shape, generator=g), torch.tensor(1.0),
              torch.randint(10, (6,), generator=g))
    out = {}
    for name, step in (("eager", eager_step), ("fused", fused_step)):
        model = copy.deepcopy(net)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = make_optimizer(model.parameters(), 1e-3, "cpu") if name == "fused" else \
            torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = step(model, ema, opt, Schedule(100), x_0, y, d, StepConfig(ema_decay=0.9), augm=augm)
        out[name] = (float(loss["loss"]), model)
    assert abs(out["fused"][0] - out["eager"][0]) <= 1e-5 * out["eager"][0]
    w_e, w_f = out["eager"][1].augm_embedding.weight, out["fused"][1].augm_embedding.weight
    assert (w_e - net.augm_embedding.weight).abs().max() > 0  # the conditioning reached the model
    assert (w_f - w_e).abs().max() <= 1e-7


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_trainer_with_augm_trains_and_resumes_exactly(tmp_path, backend):
    from cbdm_fast.training import Trainer, resume_trainer
    from train_helpers import tiny_config

    over = dict(data__augm=True, run__backend=backend, method__per_sample_drop=False)
    full = Trainer(tiny_config(tmp_path / "a", **over), log=lambda s: None)
    assert full.model.augm_embedding is not None and not full.stream.hflip
    before = full.model.augm_embedding.weight.detach().clone()
    losses_full = [full.train_step() for _ in range(4)]
    assert (full.model.augm_embedding.weight - before).abs().max() > 0
    part = Trainer(tiny_config(tmp_path / "b", **over), log=lambda s: None)
    losses_part = [part.train_step() for _ in range(2)]
    path = part.save_checkpoint()
    resumed = resume_trainer(path, log=lambda s: None)
    losses_part += [resumed.train_step() for _ in range(2)]
    assert losses_part == losses_full


def test_augm_flag_and_its_conflict_with_hflip(tmp_path):
    from cbdm_fast.train import build_parser, explicit_options
    from cbdm_fast.training.launch import config_from_options

    opts = explicit_options(build_parser().parse_args(["--augm", "--logdir", str(tmp_path)]))
    assert config_from_options(opts).data.augm is True
    with pytest.raises(ValueError, match="--augm draws its own horizontal flips"):
        config_from_options(explicit_options(build_parser().parse_args(["--augm", "--hflip"])))
