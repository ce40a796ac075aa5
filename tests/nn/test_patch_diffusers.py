"""patch_model on HF diffusers' UNet2DModel (the real library; skipped only where it is not installed).

A tiny class-conditional UNet2DModel (DownBlock2D, AttnDownBlock2D, mid block, AttnUpBlock2D,
UpBlock2D; 16/32 channels in 4 groups, 8x8 images, batch 2, so the Triton interpreter keeps each test
to seconds), in both time-embedding modes, with random GroupNorm affines (never the identity).

Tolerances (fp32), as tests/nn/test_patch_model.py, and what was measured (seed 0):
  * outputs: |patched - ref| <= 1e-5 |ref| + 1e-5 max|ref|; measured max error / max|ref| ~5e-7.
  * gradients, every parameter and the input: |g - g_ref| <= 1e-4 |g_ref| + 1e-5 G, G = the largest
    |g_ref| over all parameters.
  * DDPMScheduler training, 3 Adam steps: per-step losses rel 1e-4.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cbdm_fast import unpatch_model
from cbdm_fast.nn import GroupNormSiLU, patch_model
from patch_helpers import assert_forward_backward_close

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402 (after the skip)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_LOSS_RTOL = 1e-4
MODES = ("default", "scale_shift")


def randomize_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return model


def tiny_unet(mode: str = "default") -> nn.Module:
    return randomize_norms(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attn_norm_num_groups=4, attention_head_dim=8, num_class_embeds=10,
        resnet_time_scale_shift=mode))


def names_of(model: nn.Module, class_name: str):
    return [n for n, m in model.named_modules() if type(m).__name__ == class_name]


# ----------------------------------------------------------------------------------------------
# structure and report (no kernels run)


@pytest.mark.parametrize("mode", MODES)
def test_report_state_dict_and_unpatch(mode, capsys):
    model = tiny_unet(mode)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 50]), torch.tensor([1, 7])
    with torch.no_grad():
        before = model(x, t, y).sample
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    originals = {n: (m, type(m)) for n, m in model.named_modules()}
    resnets, attentions = names_of(model, "ResnetBlock2D"), names_of(model, "Attention")
    assert len(resnets) == 8 and len(attentions) == 4

    report = patch_model(model, verbose=True)
    assert capsys.readouterr().out.strip() == str(report)
    # every ResnetBlock2D: norm1 -> SiLU one op; norm2 -> SiLU with the time-embedding add in "default" mode,
    # diffusers' own scale/shift + SiLU after the fused norm in "scale_shift" mode, and reported as left
    for n in resnets:
        entry = report.module(n)
        assert entry.kind == "ResnetBlock2D" and isinstance(model.get_submodule(n), ResnetBlock2D)
        norm1, norm2 = entry.norms
        assert (norm1.name, norm1.act, norm1.add) == (f"{n}.norm1", True, False)
        if mode == "default":
            assert (norm2.name, norm2.act, norm2.add) == (f"{n}.norm2", True, True) and entry.left == ()
        else:
            assert (norm2.name, norm2.act, norm2.add) == (f"{n}.norm2", False, False)
            assert len(entry.left) == 1 and "scale/shift" in entry.left[0]
    for n in attentions:  # the norm alone (no activation follows it); the processor kept
        entry = report.module(n)
        assert [(f.name, f.act) for f in entry.norms] == [(f"{n}.group_norm", False)]
        assert entry.left == ("processor AttnProcessor2_0 kept: it already calls F.scaled_dot_product_attention",)
    assert [(f.name, f.act) for f in report.module("").norms] == [("conv_norm_out", True)]
    n_pairs = (2 if mode == "default" else 1) * len(resnets) + 1  # + conv_norm_out -> conv_act
    assert report.pairs_fused == n_pairs and report.adds_fused == (len(resnets) if mode == "default" else 0)
    assert len(report.norms) == sum(type(m) is nn.GroupNorm for m, _ in originals.values())
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    assert sum(isinstance(m, GroupNormSiLU) for m in model.modules()) == len(report.norms)

    # state-dict keys, parameter names and objects unchanged; patching again is a no-op
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert patch_model(model) == [] and patch_model(model).modules == []

    restored = unpatch_model(model)
    assert sorted(restored) == sorted(report)
    after = dict(model.named_modules())
    assert after.keys() == originals.keys()
    assert all(after[n] is m and type(m) is cls for n, (m, cls) in originals.items())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, before)


# ----------------------------------------------------------------------------------------------
# the kernel path (Triton interpreter on the CPU)


@pytest.mark.parametrize("mode", MODES)
def test_patched_outputs_and_gradients_match(mode):
    ref = tiny_unet(mode)
    model = copy.deepcopy(ref)
    patch_model(model)
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.tensor([7, 93]), torch.tensor([2, 9])
    assert_forward_backward_close(model, ref, [x.clone().requires_grad_()], [x.clone().requires_grad_()], ["dx"],
                                  call=lambda m, x: m(x, t, y).sample)
    assert all(p.grad is not None for p in ref.parameters())  # every parameter was compared


def resnet_block(**kw) -> nn.Module:
    args = dict(in_channels=8, out_channels=12, temb_channels=6, groups=2, eps=1e-6)
    return randomize_norms(ResnetBlock2D(**{**args, **kw}))


@pytest.mark.parametrize("kw, fused_pairs, adds, left", [
    # upsampling, the 1x1 conv shortcut (8 -> 12 channels), the output scale, no act on temb
    (dict(up=True, output_scale_factor=2.0, skip_time_act=True), 2, 1, 0),
    (dict(down=True, time_embedding_norm="scale_shift"), 1, 0, 1),
    (dict(in_channels=12, non_linearity="mish"), 0, 0, 1),  # not SiLU: both norms alone
], ids=["up-shortcut-scale-skip_time_act", "down-scale_shift", "mish"])
def test_resnet_block_variants_match(kw, fused_pairs, adds, left):
    ref = resnet_block(**kw)
    block = copy.deepcopy(ref)
    report = patch_model(block)  # the root block, patched in place
    assert (report.pairs_fused, report.adds_fused, len(report.left)) == (fused_pairs, adds, left)
    x = torch.randn(2, ref.in_channels, 6, 6)
    temb = torch.randn(2, 6)
    inputs = [(x.clone().requires_grad_(), temb.clone().requires_grad_()) for _ in range(2)]
    assert_forward_backward_close(block, ref, inputs[0], inputs[1], ("dx", "dtemb"))
    assert all(p.grad is not None for p in ref.parameters())
    unpatch_model(block)
    assert type(block) is type(ref) and all(type(block._modules[n]) is nn.GroupNorm for n in ("norm1", "norm2"))


# ----------------------------------------------------------------------------------------------
# a client's training loop: diffusers' DDPMScheduler (add_noise), the MSE loss, Adam


def train_steps(model, opt, steps=3):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(steps):
        x0 = torch.randn(2, 3, 8, 8, generator=g)
        noise = torch.randn(2, 3, 8, 8, generator=g)
        t = torch.randint(0, 100, (2,), generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ddpm_scheduler_training_losses_match():
    ref = tiny_unet()
    model = copy.deepcopy(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # built BEFORE patching: must still drive it
    patch_model(model)
    start = [p.detach().clone() for p in model.parameters()]
    losses, ref_losses = train_steps(model, opt), train_steps(ref, opt_ref)
    assert losses == pytest.approx(ref_losses, rel=TRAIN_LOSS_RTOL)
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))  # the optimizer trained it
