"""cbdm_fast.nn: GroupNormSiLU, FusedAttnBlock and patch_model / unpatch_model on our UNet (the
authors' classes) and on plain modules; HF diffusers' UNet2DModel: tests/nn/test_patch_diffusers.py.

Our UNet stands in for the authors' (same class names, children and forward). Without a GPU the
Triton kernels run through the interpreter (TRITON_INTERPRET=1, tests/conftest.py), which costs
~0.05 s per (sample, group) program per call, so the kernel-path tests use batch 2 (1 for compile),
8x8 images and the tiny UNet; the 20-step training comparison runs the patched structure (fused
time-embedding add, one q/k/v GEMM, SDPA) with the torch reference norm on the CPU, and with the
Triton kernels in the gpu test.

Tolerances (fp32), and what was measured (seed 0):
  * outputs: |patched - ref| <= 1e-5 |ref| + 1e-5 max|ref|; measured max error / max|ref| 8e-7.
  * gradients of cbdm_loss, every parameter: |g - g_ref| <= 1e-4 |g_ref| + 1e-5 G, G = the largest
    |g_ref| over all parameters; measured max error / G 1.3e-6.
  * golden fixture: eps_cond within rtol 1e-5, atol 1e-5 max|eps_cond|.
  * training, 20 Adam steps (lr 1e-3), ch=64: per-step losses rel 1e-4 (measured 1.2e-5); final
    parameters elementwise |p - p_ref| <= 2e-3 = 2 lr (measured 4e-4: Adam's elementwise
    normalisation amplifies relative differences of tiny gradients), and in norm
    |p - p_ref| / |p_ref - p_init| <= 1e-3 over all compared parameters (measured 6e-5).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import init

from assert_helpers import assert_close
from cbdm_fast.losses import cbdm_loss
from cbdm_fast.model import AttnBlock, ResBlock, UNet
from cbdm_fast.nn import FusedAttnBlock, GroupNormSiLU, patch_model, unpatch_model
from cbdm_fast.schedule import Schedule
from patch_helpers import assert_forward_backward_close, assert_out_close, assert_param_grads_close

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_LOSS_RTOL, TRAIN_PARAM_ATOL, TRAIN_UPDATE_RTOL = 1e-4, 2e-3, 1e-3


def tiny_unet(in_ch=3, T=100, ch=32):
    """The tiny UNet with every weight random and O(1) in effect: random GroupNorm affine (never the
    identity), and the gain-1e-5 convolutions re-initialised so every block contributes."""
    model = UNet(T=T, ch=ch, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, num_class=10, in_ch=in_ch,
                 dropout=0.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
            elif isinstance(m, ResBlock):
                init.xavier_uniform_(m.block2[-1].weight)
            elif isinstance(m, AttnBlock):
                init.xavier_uniform_(m.proj.weight)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        init.xavier_uniform_(model.tail[-1].weight)
    return model


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


# ----------------------------------------------------------------------------------------------
# structure (no kernels run)


def test_patch_unet_structure_names_and_shared_parameters():
    model = tiny_unet()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    gn_names = [n for n, m in model.named_modules() if type(m) is nn.GroupNorm]
    attn_names = [n for n, m in model.named_modules() if type(m) is AttnBlock]
    res_names = [n for n, m in model.named_modules() if type(m) is ResBlock]
    n_gn = len(gn_names)
    assert n_gn == 2 * len(res_names) + len(attn_names) + 1  # block1, block2, attention, tail

    names = patch_model(model)
    # every GroupNorm gone; each (GroupNorm, Swish) pair fused; each AttnBlock and ResBlock patched
    assert count(model, nn.GroupNorm) == 0 and count(model, AttnBlock) == 0
    assert sum(isinstance(m, GroupNormSiLU) for m in model.modules()) == n_gn
    assert count(model, FusedAttnBlock) == len(attn_names)
    for n in attn_names:
        assert n in names and f"{n}.group_norm" not in names  # adopted by the FusedAttnBlock
        assert model.get_submodule(f"{n}.group_norm").act is False
    for n in res_names:
        assert n in names and isinstance(model.get_submodule(n), ResBlock)  # the UNet's isinstance holds
        assert type(model.get_submodule(n)).__name__ == "FusedResBlock"
        for blk in ("block1", "block2"):
            assert f"{n}.{blk}.0" in names and f"{n}.{blk}.1" in names
            assert model.get_submodule(f"{n}.{blk}.0").act is True
            assert isinstance(model.get_submodule(f"{n}.{blk}.1"), nn.Identity)
    assert {"tail.0", "tail.1"} <= set(names)
    assert set(gn_names) - set(names) == {f"{n}.group_norm" for n in attn_names}
    assert len(names) == len(set(names))
    # the report: per ResBlock both pairs and the time-embedding add; per AttnBlock its norm; the tail's pair
    for n in res_names:
        assert [(f.name, f.act, f.add) for f in names.module(n).norms] == [
            (f"{n}.block1.0", True, False), (f"{n}.block2.0", True, True)]
    for n in attn_names:
        assert [(f.name, f.act) for f in names.module(n).norms] == [(f"{n}.group_norm", False)]
    assert [(f.name, f.act) for f in names.module("tail").norms] == [("tail.0", True)]
    assert names.pairs_fused == 2 * len(res_names) + 1 and names.adds_fused == len(res_names)
    assert len(names.norms) == n_gn and names.left == []

    # parameter names, order and objects unchanged
    assert list(model.state_dict()) == keys
    assert list(dict(model.named_parameters())) == list(params)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert patch_model(model) == []  # idempotent
    # a deep copy (an EMA model, say) keeps the structure and the key set
    ema = copy.deepcopy(model)
    assert list(ema.state_dict()) == keys and type(ema.downblocks[0]).__name__ == "FusedResBlock"


def test_unpatch_restores_original_modules_and_exact_outputs():
    model = tiny_unet()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 50]), torch.tensor([1, 7])
    with torch.no_grad():
        before = model(x, t, y)
    originals = dict(model.named_modules())
    classes = {n: type(m) for n, m in originals.items()}
    keys = list(model.state_dict())
    names = patch_model(model)
    restored = unpatch_model(model)
    assert sorted(restored) == sorted(names)
    after_modules = dict(model.named_modules())
    assert after_modules.keys() == originals.keys()
    assert all(after_modules[n] is m and type(m) is classes[n] for n, m in originals.items())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x, t, y), before)
    assert unpatch_model(model) == []


def test_patch_model_and_unpatch_model_are_exported_lazily():
    import cbdm_fast
    from cbdm_fast import unpatch_model as top_level_unpatch
    assert cbdm_fast.patch_model is patch_model and top_level_unpatch is unpatch_model


# ----------------------------------------------------------------------------------------------
# the kernel path (Triton interpreter on the CPU)


def test_patched_unet_outputs_and_cbdm_gradients_match():
    ref = tiny_unet(in_ch=3)
    model = copy.deepcopy(ref)
    patch_model(model)
    schedule = Schedule(100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([7, 93])
    y, y_bal = torch.tensor([2, 9]), torch.tensor([5, 0])

    outs = {}
    for name, m in (("patched", model), ("ref", ref)):
        seen = []
        hook = m.register_forward_hook(lambda mod, args, kwargs, out, seen=seen: seen.append(out.detach()),
                                       with_kwargs=True)
        loss_ddpm, loss_reg = cbdm_loss(m, schedule, x0, y, t, noise, y_bal=y_bal, tau=1.0)
        (loss_ddpm + loss_reg).backward()
        hook.remove()
        outs[name] = (seen, loss_ddpm.item(), loss_reg.item())
    for (a, b), what in zip(zip(outs["patched"][0], outs["ref"][0]), ("cond y", "cond y_bal")):
        assert_out_close(a, b, name=f"eps ({what})")
    assert outs["patched"][1] == pytest.approx(outs["ref"][1], rel=1e-5)
    assert outs["patched"][2] == pytest.approx(outs["ref"][2], rel=1e-5)
    worst = assert_param_grads_close(model, ref)
    print(f"cbdm grads: max |g - g_ref| / max|g_ref| = {worst:.2e}; eps: max err / max|ref| = "
          + ", ".join(f"{((a - b).abs().max() / b.abs().max()).item():.2e}"
                      for a, b in zip(outs['patched'][0], outs['ref'][0])))

    # unconditional (y=None)
    x_t = schedule.q_sample(x0, t, noise)
    with torch.no_grad():
        a, b = model(x_t, t), ref(x_t, t)
    assert_out_close(a, b, name="eps (uncond)")


def test_patched_unet_reproduces_the_golden_fixture(fixture):
    model = UNet(**fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    model.eval()
    patch_model(model)
    model.load_state_dict(fixture["state_dict"], strict=True)  # keys unchanged: loads into the patched model
    n = 2  # samples are independent; two keep the interpreter fast
    with torch.no_grad():
        eps = model(fixture["x_t"][:n], fixture["t"][:n], fixture["y"][:n])
    expected = fixture["eps_cond"][:n]
    assert_out_close(eps, expected, name="eps_cond")


def test_patched_unet_compiles_without_graph_breaks():
    model = tiny_unet(in_ch=1)
    patch_model(model)
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([42]), torch.tensor([3])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_generic_module_is_patched_and_matches():
    class Swish(nn.Module):  # an activation recognised by its class name
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                                     nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8))
            self.norm = nn.GroupNorm(2, 8, eps=1e-4)
            self.act = Swish()
            self.seq2 = nn.Sequential(nn.GroupNorm(1, 8), Swish())

        def forward(self, x):
            return self.seq2(self.act(self.norm(self.net(x))))

    ref = Block()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    names = patch_model(model)
    assert names == ["net.1", "net.2", "net.4", "norm", "seq2.0", "seq2.1"]
    # the pairs inside an nn.Sequential are fused; the norm before a forward's own act is reported as left
    assert [(m.name, [(f.name, f.act) for f in m.norms], len(m.left)) for m in names.modules] == [
        ("net", [("net.1", True)], 0), ("net.4", [("net.4", False)], 1), ("norm", [("norm", False)], 1),
        ("seq2", [("seq2.0", True)], 0)]
    assert list(model.state_dict()) == keys and count(model, nn.GroupNorm) == 0
    assert model.net[1].act and not model.net[4].act and not model.norm.act and model.seq2[0].act
    assert model.norm.eps == 1e-4 and model.net[1].weight is model.net[1]._cbdm_original.weight
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    assert_forward_backward_close(model, ref, [x], [x.detach().clone().requires_grad_()], ["dx"])
    unpatch_model(model)
    assert count(model, nn.GroupNorm) == 4 and type(model.net[2]) is nn.SiLU


def test_root_res_block_channels_last_outputs_and_gradients():
    ref = ResBlock(64, 64, tdim=32, dropout=0.0, attn=True)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
        init.xavier_uniform_(ref.block2[-1].weight)
    model = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    names = patch_model(model)  # the root ResBlock is class-swapped in place
    assert names[0] == "" and "attn" in names and isinstance(model, ResBlock)
    x = torch.randn(1, 64, 4, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    temb = torch.randn(1, 32, requires_grad=True)
    ref_inputs = [x.detach().contiguous().requires_grad_(), temb.detach().clone().requires_grad_()]
    assert_forward_backward_close(model, ref, [x, temb], ref_inputs, ["dx", "dtemb"])
    unpatch_model(model)
    assert type(model) is ResBlock and type(model.attn) is AttnBlock


def test_sequential_subclass_is_not_pair_fused():
    class MySeq(nn.Sequential):
        def forward(self, x):
            return self[0](x) + self[1](x)  # a forward that does not chain its children

    m = nn.Sequential(MySeq(nn.GroupNorm(2, 4), nn.SiLU()))
    names = patch_model(m)
    assert names == ["0.0"] and not m[0][0].act and type(m[0][1]) is nn.SiLU


def test_group_norm_silu_module_api():
    gn = GroupNormSiLU(2, 6)
    assert list(gn.state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormSiLU(4, 6)
    with pytest.raises(ValueError, match="backend"):
        patch_model(nn.Sequential(), backend="cuda")
    with pytest.raises(TypeError, match="AttnBlock"):
        FusedAttnBlock.from_attn_block(nn.Conv2d(1, 1, 1))
    x = torch.randn(3, 6)  # rank 2, as nn.GroupNorm accepts
    assert_close(GroupNormSiLU(2, 6, act=False)(x), nn.GroupNorm(2, 6)(x), atol=0, name="rank 2")


# ----------------------------------------------------------------------------------------------
# training: 20 Adam steps, patched vs reference, same init and the same batches


def train_steps(model, opt, steps, device, in_ch=1, batch=4, size=8):
    schedule = Schedule(100).to(device)
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(steps):
        x0 = torch.randn(batch, in_ch, size, size, generator=g).to(device)
        noise = torch.randn(batch, in_ch, size, size, generator=g).to(device)
        t = torch.randint(0, 100, (batch,), generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        y_bal = torch.randint(0, 10, (batch,), generator=g).to(device)
        loss_ddpm, loss_reg = cbdm_loss(model, schedule, x0, y, t, noise, y_bal=y_bal, tau=1.0)
        loss = loss_ddpm + loss_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_training_comparison(device, backend, steps=20):
    # ch=64: two channels per group. With ch=32 each group is one channel, so a per-channel
    # constant before a GroupNorm (block1's conv bias, the time-embedding add) is cancelled
    # exactly: its true gradient is 0 and the computed one is rounding noise, which Adam
    # normalises into lr-sized steps in random directions in both runs alike.
    ref = tiny_unet(in_ch=1, ch=64).to(device)
    model = copy.deepcopy(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # built BEFORE patching: must still drive it
    patch_model(model, backend=backend)
    init_params = [p.detach().clone() for p in model.parameters()]
    losses = train_steps(model, opt, steps, device)
    ref_losses = train_steps(ref, opt_ref, steps, device)
    assert losses == pytest.approx(ref_losses, rel=TRAIN_LOSS_RTOL)
    # Compared: every parameter but the attention key biases, whose true gradient is exactly 0
    # (softmax is invariant to q.b_k added to a whole row): their computed gradient is rounding
    # noise (~1e-10) that Adam normalises into lr-sized steps, differently in any two valid runs.
    diff2 = update2 = 0.0
    worst = 0.0
    for (n, p), p_ref, p0 in zip(model.named_parameters(), ref.parameters(), init_params):
        if n.endswith("proj_k.bias"):
            continue
        assert_close(p, p_ref, atol=TRAIN_PARAM_ATOL, name=f"param {n} after {steps} steps")
        worst = max(worst, (p - p_ref).abs().max().item())
        diff2 += (p - p_ref).double().pow(2).sum().item()
        update2 += (p_ref - p0).double().pow(2).sum().item()
    assert update2 ** 0.5 > 1e-2  # the optimizer, built before patching, really trained both
    rel_update = (diff2 / update2) ** 0.5
    assert rel_update <= TRAIN_UPDATE_RTOL, rel_update
    rel_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    print(f"training {device}/{backend}: max rel loss diff {rel_loss:.2e}, max |p - p_ref| {worst:.2e}, "
          f"|p - p_ref| / |p_ref - p_init| {rel_update:.2e}")
    return worst


def test_training_patched_structure_matches_reference_20_steps():
    # the CPU run: the fused ResBlock / attention structure with the torch reference norm
    run_training_comparison("cpu", backend="reference")


@pytest.mark.gpu
def test_training_patched_triton_matches_reference_20_steps_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run_training_comparison("cuda", backend="auto")
