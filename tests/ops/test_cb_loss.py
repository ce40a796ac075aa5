"""ops.cb_loss: the fused Triton kernels (through the interpreter on CPU, TRITON_INTERPRET=1) and the
reference against cbdm_fast.losses.cbdm_terms (values and both gradients by autograd), the golden
fixture, float64, the 2B-batch halves, keep, torch.compile and the errors.

Tolerances:
- float32 vs cbdm_terms: losses rtol 1e-6; gradients atol 1e-6 x max|reference grad| (+ rtol 1e-5).
  Only the summation order differs; measured: losses <= 2.2e-7 relative, gradients <= 2.1e-7 x max.
- fixture: loss_ddpm and loss_reg to 1e-6 relative (measured 1.1e-7 and 0).
- bfloat16 / float16: error against float64 at most K_LOSS = 1 x torch's own error (cbdm_terms run in that
  dtype) for the losses, and K_GRAD = 2 x for the gradients (each floored at K half-ulps of the largest
  value). We accumulate in float32 and round the gradients once; measured error / (1 x torch's error):
  <= 2.5e-4 for the losses, 0.3-0.8 for the gradients.
- keep = 0: loss_reg and dh_bal are exactly 0 (asserted with ==).
"""
import pytest
import torch

from assert_helpers import assert_op_and_reference_raise
from cbdm_fast import ops
from cbdm_fast.losses import cbdm_terms
from cbdm_fast.ops import _common
from cbdm_fast.ops._common import dense_batch_outer, match_layout, triton_blocker
from cbdm_fast.ops.cb_loss import cb_loss, cb_loss_reference
from cbdm_fast.ops.q_sample import q_sample
from cbdm_fast.schedule import Schedule

T = 1000
TAU = 0.8
G1, G2 = 0.7, 1.9          # upstream gradients of (loss_ddpm, loss_reg): the two must not be assumed equal
K_LOSS, K_GRAD = 1.0, 2.0
LOSS_TOL = dict(rtol=1e-6, atol=0.0)

TRITON_CPU_REASON = (triton_blocker("cb_loss", torch.empty(0)) or (None, ""))[1]
needs_triton_cpu = pytest.mark.skipif(bool(TRITON_CPU_REASON), reason=TRITON_CPU_REASON or "")
# kernel tests run on CPU tensors through the interpreter and, marked gpu, on CUDA tensors (compiled)
DEVICES = [pytest.param("cpu", marks=needs_triton_cpu, id="cpu"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _to(device, *tensors):
    return tuple(None if v is None else v.to(device) for v in tensors)


def _close(actual, expected, name, **tol):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")


def _grad_close(actual, expected, name):
    atol = 1e-6 * expected.abs().max().item()
    _close(actual, expected, name, rtol=1e-5, atol=atol)


def _lowp_bound(torch_lowp, ref64, k, dtype):
    eps = torch.finfo(dtype).eps
    err = (torch_lowp.double() - ref64).abs().max().item()
    return k * max(err, 0.5 * eps * ref64.abs().max().item())


def _make(shape, dtype=torch.float32, layout="contiguous"):
    B = shape[0]
    h = torch.randn(shape)
    h_bal = h + 0.3 * torch.randn(shape)  # the two label passes are close, as in training
    noise = torch.randn(shape)
    t = torch.randint(0, T, (B,))
    t[0] = T - 1
    if B > 1:
        t[1] = 0
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    h, h_bal, noise = (v.to(dtype).contiguous(memory_format=fmt) for v in (h, h_bal, noise))
    return h, h_bal, noise, t


def _keep(kind, B):
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(B)
    if kind == "mixed":
        return (torch.arange(B) % 2 == 0).float()
    if kind == "zero_scalar":
        return torch.tensor(0.0)
    if kind == "one_scalar":
        return torch.tensor(1.0)
    if kind == "bool":
        return torch.arange(B) % 3 != 1
    raise ValueError(kind)


def _keep_for_terms(keep, B):
    """cbdm_terms wants a (B,) keep."""
    return None if keep is None else keep.float().expand(B).clone()


def _run(fn, h, h_bal, noise, t, keep, **kw):
    """(loss_ddpm, loss_reg, dh, dh_bal) for loss = G1 loss_ddpm + G2 loss_reg."""
    h = h.detach().clone().requires_grad_(True)
    h_bal = h_bal.detach().clone().requires_grad_(True)
    l1, l2 = fn(h, h_bal, noise, t, T, TAU, keep, **kw)
    (G1 * l1 + G2 * l2).backward()
    return l1.detach(), l2.detach(), h.grad, h_bal.grad


def _oracle(h, h_bal, noise, t, keep):
    return _run(cbdm_terms, h, h_bal, noise, t, _keep_for_terms(keep, h.shape[0]))


# ----------------------------------------------------------------------------- fixture

@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=needs_triton_cpu), "reference"])
def test_fixture_losses(fixture, backend):
    l1, l2 = cb_loss(fixture["eps_cond"], fixture["eps_bal"], fixture["noise"], fixture["t"], 1000,
                     fixture["tau"], backend=backend)
    assert l1.dtype == l2.dtype == torch.float32 and l1.dim() == l2.dim() == 0
    assert l1.item() == pytest.approx(fixture["loss_ddpm"], rel=1e-6)
    assert l2.item() == pytest.approx(fixture["loss_reg"], rel=1e-6)


# ----------------------------------------------------------------------------- float32 vs cbdm_terms

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [
    ((5, 3, 8, 8), "contiguous"), ((1, 3, 5, 5), "contiguous"), ((2, 3, 33, 17), "contiguous"),  # 2 blocks/sample
    ((5, 3, 7, 9), "channels_last"),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("keep_kind", ["none", "ones", "mixed", "zero_scalar", "one_scalar", "bool"])
def test_fp32_matches_cbdm_terms(shape, layout, keep_kind, device):
    h, h_bal, noise, t, keep = _to(device, *_make(shape, layout=layout), _keep(keep_kind, shape[0]))
    l1, l2, dh, dhb = _run(cb_loss, h, h_bal, noise, t, keep, backend="triton")
    r1, r2, rdh, rdhb = _oracle(h, h_bal, noise, t, keep)
    _close(l1, r1, "loss_ddpm", **LOSS_TOL)
    _close(l2, r2, "loss_reg", **LOSS_TOL)
    _grad_close(dh, rdh, "d h")
    _grad_close(dhb, rdhb, "d h_bal")
    assert dh.dtype == dhb.dtype == torch.float32 and dh.shape == h.shape
    if keep_kind == "zero_scalar":
        assert l2.item() == 0.0 and bool((dhb == 0).all()), "keep=0 must switch the regulariser off exactly"


@pytest.mark.parametrize("keep_kind", ["none", "mixed", "zero_scalar"])
def test_reference_equals_cbdm_terms(keep_kind):
    h, h_bal, noise, t = _make((4, 3, 6, 6))
    keep = _keep(keep_kind, 4)
    got = _run(cb_loss, h, h_bal, noise, t, keep, backend="reference")
    want = _oracle(h, h_bal, noise, t, keep)
    for name, a, b in zip(("loss_ddpm", "loss_reg", "d h", "d h_bal"), got, want):
        assert torch.equal(a, b), f"{name}: reference differs from cbdm_terms"
    assert ops.cb_loss is cb_loss and ops.cb_loss_reference is cb_loss_reference


@needs_triton_cpu
@pytest.mark.parametrize("keep", [torch.tensor(0.0), torch.zeros(3)], ids=["scalar", "vector"])
def test_keep_zero_is_exact(keep):
    h, h_bal, noise, t = _make((3, 3, 6, 6))
    l1, l2, dh, dhb = _run(cb_loss, h, h_bal, noise, t, keep, backend="triton")
    assert l2.item() == 0.0 and bool((dhb == 0).all())
    # the same as plain DDPM
    h_r = h.clone().requires_grad_(True)
    r1, _ = cbdm_terms(h_r, None, noise, t, T, TAU)
    (G1 * r1).backward()
    _close(l1, r1.detach(), "loss_ddpm", **LOSS_TOL)
    _grad_close(dh, h_r.grad, "d h (keep = 0)")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton_cpu), "reference"])
def test_keep_as_a_number(backend):
    """A Python-number keep (a bool too) gives what the same value as a 0-d tensor gives."""
    h, h_bal, noise, t = _make((3, 3, 6, 6))
    for number in (0, 1, 0.25, True, False):
        got = _run(cb_loss, h, h_bal, noise, t, number, backend=backend)
        want = _run(cb_loss, h, h_bal, noise, t, torch.tensor(float(number)), backend=backend)
        for name, a, b in zip(("loss_ddpm", "loss_reg", "d h", "d h_bal"), got, want):
            assert torch.equal(a, b), f"{name} (keep = {number!r})"


@needs_triton_cpu
def test_h_bal_none_is_plain_ddpm():
    h, _, noise, t = _make((3, 3, 6, 6))
    h = h.requires_grad_(True)
    l1, l2 = cb_loss(h, None, noise, t, T, TAU, backend="triton")
    (G1 * l1 + G2 * l2).backward()
    h_r = h.detach().clone().requires_grad_(True)
    r1, r2 = cbdm_terms(h_r, None, noise, t, T, TAU)
    (G1 * r1 + G2 * r2).backward()
    assert l2.item() == 0.0
    _close(l1.detach(), r1.detach(), "loss_ddpm", **LOSS_TOL)
    _grad_close(h.grad, h_r.grad, "d h")


@needs_triton_cpu
@pytest.mark.parametrize("which", ["ddpm", "reg"])
def test_backward_of_one_term(which):
    h, h_bal, noise, t = _make((3, 3, 6, 6))
    grads = []
    for fn in (cb_loss, cbdm_terms):
        hh, hb = h.clone().requires_grad_(True), h_bal.clone().requires_grad_(True)
        kw = dict(backend="triton") if fn is cb_loss else {}
        l1, l2 = fn(hh, hb, noise, t, T, TAU, **kw)
        (l1 if which == "ddpm" else l2).backward()
        grads.append((hh.grad, hb.grad))
    _grad_close(grads[0][0], grads[1][0], f"d h ({which} only)")
    if which == "ddpm":
        assert grads[0][1] is None or bool((grads[0][1] == 0).all())
    else:
        _grad_close(grads[0][1], grads[1][1], "d h_bal (reg only)")


@needs_triton_cpu
def test_only_h_bal_requires_grad_and_no_grad_mode():
    h, h_bal, noise, t = _make((3, 3, 6, 6))
    hb = h_bal.clone().requires_grad_(True)
    _, l2 = cb_loss(h, hb, noise, t, T, TAU, backend="triton")
    l2.backward()
    hb_r = h_bal.clone().requires_grad_(True)
    cbdm_terms(h, hb_r, noise, t, T, TAU)[1].backward()
    _grad_close(hb.grad, hb_r.grad, "d h_bal (h constant)")
    # no_grad: the same values, deterministic (no atomics): bit-identical across calls and modes
    with torch.no_grad():
        a = cb_loss(h.requires_grad_(True), hb, noise, t, T, TAU, backend="triton")
    b = cb_loss(h, hb, noise, t, T, TAU, backend="triton")
    c = cb_loss(h, hb, noise, t, T, TAU, backend="triton")
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y.detach()) and torch.equal(y, z)


# ----------------------------------------------------------------------------- the 2B batch

@needs_triton_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_halves_of_one_batch(layout):
    B = 3
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = torch.randn(2 * B, 3, 5, 7).contiguous(memory_format=fmt).requires_grad_(True)
    _, _, noise, t = _make((B, 3, 5, 7), layout=layout)
    keep = torch.tensor([1.0, 0.0, 1.0])
    h, h_bal = out[:B], out[B:]
    # no copies: the halves already have the kernels' layout
    assert dense_batch_outer(h) is h and match_layout(h_bal, h) is h_bal and match_layout(noise, h) is noise
    l1, l2 = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep, backend="triton")
    (G1 * l1 + G2 * l2).backward()
    out_r = out.detach().clone().requires_grad_(True)
    r1, r2 = cbdm_terms(out_r[:B], out_r[B:], noise, t, T, TAU, keep=keep)
    (G1 * r1 + G2 * r2).backward()
    _close(l1.detach(), r1.detach(), "loss_ddpm", **LOSS_TOL)
    _close(l2.detach(), r2.detach(), "loss_reg", **LOSS_TOL)
    _grad_close(out.grad, out_r.grad, "d out (both halves)")
    assert bool((out.grad[B + 1] == 0).all()), "sample with keep = 0 must get no h_bal gradient"


@needs_triton_cpu
def test_mixed_and_strided_layouts():
    h, h_bal, noise, t = _make((2, 3, 6, 10))
    h_cl = h.contiguous(memory_format=torch.channels_last)
    noise_strided = torch.randn(2, 3, 6, 20)[..., ::2]
    got = _run(cb_loss, h_cl, h_bal, noise_strided, t, None, backend="triton")
    want = _oracle(h, h_bal, noise_strided, t, None)
    for name, a, b in zip(("loss_ddpm", "loss_reg"), got[:2], want[:2]):
        _close(a, b, name, **LOSS_TOL)
    _grad_close(got[2], want[2], "d h")
    _grad_close(got[3], want[3], "d h_bal")


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_kind", ["none", "mixed"])
def test_low_precision_within_torch_error(dtype, keep_kind, device):
    h, h_bal, noise, t, keep = _to(device, *_make((5, 3, 7, 9), dtype=dtype), _keep(keep_kind, 5))
    got = _run(cb_loss, h, h_bal, noise, t, keep, backend="triton")
    assert got[0].dtype == got[1].dtype == torch.float32 and got[2].dtype == got[3].dtype == dtype
    torch_lowp = _oracle(h, h_bal, noise, t, keep)  # cbdm_terms evaluated in `dtype`
    ref64 = _oracle(h.double(), h_bal.double(), noise.double(), t, keep)
    for i, name in enumerate(("loss_ddpm", "loss_reg", "d h", "d h_bal")):
        k = K_LOSS if i < 2 else K_GRAD
        bound = _lowp_bound(torch_lowp[i], ref64[i], k, dtype)
        err = (got[i].double() - ref64[i]).abs().max().item()
        assert err <= bound, f"{name} {dtype}: error {err:.3e} vs fp64 > {k} x torch's {dtype} error ({bound:.3e})"


# ----------------------------------------------------------------------------- dispatch and compile

def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(_common, "triton_mode", lambda: "compiled")  # kernels built without the interpreter
    h, h_bal, noise, t = _make((2, 3, 4, 4))
    got = cb_loss(h, h_bal, noise, t, T, TAU)
    want = cbdm_terms(h, h_bal, noise, t, T, TAU)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cb_loss(h, h_bal, noise, t, T, TAU, backend="triton")


def _train_like(schedule):
    """x_t = q_sample; a 2B "network" pass; both losses from the halves. Returns the summed loss."""
    tables = (schedule.sqrt_alphas_bar, schedule.sqrt_one_minus_alphas_bar)

    def fn(x0, t, noise, weight, keep):
        x_t = q_sample(x0, t, noise, *tables)
        out = torch.cat([x_t * weight, x_t * weight * 0.5 + 0.1])
        B = x0.shape[0]
        l1, l2 = cb_loss(out[:B], out[B:], noise, t, T, 1.0, keep=keep)
        return l1 + l2
    return fn


@needs_triton_cpu
def test_compile_fullgraph_no_graph_break_with_backward():
    from torch._dynamo.utils import counters

    fn = _train_like(Schedule(T))
    x0 = torch.randn(3, 3, 6, 6, requires_grad=True)
    noise = torch.randn(3, 3, 6, 6)
    t = torch.tensor([0, 500, T - 1])
    keep = torch.tensor(1.0)
    weight = torch.randn(3, 6, 6, requires_grad=True)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(x0, t, noise, weight, keep)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x0.grad = weight.grad = None
    loss = compiled(x0, t, noise, weight, keep)
    loss.backward()  # the compiled backward graph: cb_loss_backward, then q_sample_backward
    got = (loss.detach(), x0.grad.clone(), weight.grad.clone())
    assert not counters["graph_break"], dict(counters["graph_break"])

    x0.grad = weight.grad = None
    loss = fn(x0, t, noise, weight, keep)
    loss.backward()
    for name, a, b in zip(("loss", "d x0", "d weight"), got, (loss.detach(), x0.grad, weight.grad)):
        _close(a, b, f"compiled {name}", rtol=1e-6, atol=1e-7)

    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        # the backward call itself inside the compiled function
        def step(x0, t, noise, weight, keep):
            loss = fn(x0, t, noise, weight, keep)
            loss.backward()
            return loss.detach()

        torch._dynamo.reset()
        counters.clear()
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            x0.grad = weight.grad = None
            torch.compile(step, backend="aot_eager", fullgraph=True)(x0, t, noise, weight, keep)
        assert not counters["graph_break"], dict(counters["graph_break"])
        _close(weight.grad, got[2], "compiled step d weight", rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


@needs_triton_cpu
@pytest.mark.parametrize("variant", ["grad", "grad_keep", "no_grad", "no_h_bal"])
def test_opcheck_custom_ops(variant):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    h, h_bal, noise, t = _make((2, 3, 4, 5))
    need = variant != "no_grad"
    h.requires_grad_(need)
    h_bal.requires_grad_(need)
    keep = torch.tensor([1.0, 0.0]) if variant == "grad_keep" else None
    args = (h, None if variant == "no_h_bal" else h_bal, noise, t, keep, T, TAU, need)
    torch.library.opcheck(torch.ops.cbdm_fast.cb_loss.default, args)
    ga, gb = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    g1, g2 = torch.tensor(0.5), torch.tensor(2.0)
    for dtype, need_h, need_hbal in ((torch.float32, True, True), (torch.bfloat16, True, False),
                                     (torch.float16, False, True)):
        torch.library.opcheck(torch.ops.cbdm_fast.cb_loss_backward.default, (ga, gb, g1, g2, dtype, need_h, need_hbal))


# ----------------------------------------------------------------------------- errors

def _bad_cases():
    h, h_bal, noise, t = _make((2, 3, 4, 4))
    meta = torch.device("meta")
    return [
        ("h not a tensor", dict(h=h.tolist()), TypeError, r"\bh\b"),
        ("h int", dict(h=h.long(), h_bal=h_bal.long(), noise=noise.long()), TypeError, r"\bh\b"),
        ("h 0-d", dict(h=torch.tensor(1.0), h_bal=torch.tensor(1.0), noise=torch.tensor(1.0)), ValueError, r"\bh\b"),
        ("h_bal shape", dict(h_bal=h_bal[:1]), ValueError, "h_bal"),
        ("h_bal dtype", dict(h_bal=h_bal.double()), TypeError, "h_bal"),
        ("h_bal not a tensor", dict(h_bal=1.0), TypeError, "h_bal"),
        ("noise shape", dict(noise=noise[:, :, :2]), ValueError, "noise"),
        ("noise dtype", dict(noise=noise.half()), TypeError, "noise"),
        ("noise device", dict(noise=noise.to(meta)), ValueError, "noise"),
        ("t int32", dict(t=t.int()), TypeError, r"\bt\b"),
        ("t 2-D", dict(t=t[None]), ValueError, r"\bt\b"),
        ("t length", dict(t=t[:1]), ValueError, r"\bt\b"),
        ("t device", dict(t=t.to(meta)), ValueError, r"\bt\b"),
        ("t = T", dict(t=torch.tensor([0, T])), ValueError, r"\bt\b"),
        ("t < 0", dict(t=torch.tensor([-1, 0])), ValueError, r"\bt\b"),
        ("T = 0", dict(T=0), ValueError, r"\bT\b"),
        ("T float", dict(T=1000.0), TypeError, r"\bT\b"),
        ("tau < 0", dict(tau=-0.5), ValueError, "tau"),
        ("tau nan", dict(tau=float("nan")), ValueError, "tau"),
        ("tau str", dict(tau="1"), TypeError, "tau"),
        ("tau inf", dict(tau=float("inf")), ValueError, "tau must be finite.*got inf"),
        ("keep -1", dict(keep=-1), ValueError, r"keep must be finite and in \[0, 1\].*got -1"),
        ("keep 2", dict(keep=2.0), ValueError, r"keep must be finite and in \[0, 1\].*got 2"),
        ("keep nan", dict(keep=float("nan")), ValueError, "keep must be finite.*got nan"),
        ("keep tensor -1", dict(keep=torch.tensor(-1.0)), ValueError, r"keep must hold values in \[0, 1\].*got -1"),
        ("keep tensor 2", dict(keep=torch.tensor([1.0, 2.0])), ValueError, r"keep must hold values in \[0, 1\].*got 2"),
        ("keep tensor nan", dict(keep=torch.tensor([float("nan"), 1.0])), ValueError, "keep must hold.*got nan"),
        ("keep shape", dict(keep=torch.ones(3)), ValueError, "keep"),
        ("keep 2-D", dict(keep=torch.ones(2, 1)), ValueError, "keep"),
        ("keep int", dict(keep=torch.ones(2, dtype=torch.int64)), TypeError, "keep"),
        ("keep list", dict(keep=[1.0, 1.0]), TypeError, "keep"),
        ("keep device", dict(keep=torch.ones(2, device=meta)), ValueError, "keep"),
        ("backend", dict(backend="cuda"), ValueError, "backend"),
        ("triton float64", dict(h=h.double(), h_bal=h_bal.double(), noise=noise.double(), backend="triton"),
         TypeError, "float64"),
    ], dict(h=h, h_bal=h_bal, noise=noise, t=t, T=T, tau=TAU, keep=None)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])), ids=[c[0] for c in _bad_cases()[0]])
def test_bad_input_raises(case):
    cases, good = _bad_cases()
    _, override, exc, pattern = cases[case]
    assert_op_and_reference_raise(cb_loss, cb_loss_reference, dict(good, **override), exc, pattern)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_cbdm_terms(dtype, layout):
    B = 48
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = torch.randn(2 * B, 3, 32, 32, device="cuda").to(dtype).contiguous(memory_format=fmt)
    _, _, noise, t = (v.cuda() for v in _make((B, 3, 32, 32), dtype=dtype, layout=layout))
    keep = (torch.arange(B, device="cuda") % 4 != 0).float()
    got = _run(cb_loss, out[:B], out[B:], noise, t, keep, backend="triton")
    if dtype == torch.float32:
        want = _oracle(out[:B], out[B:], noise, t, keep)
        _close(got[0], want[0], "loss_ddpm", **LOSS_TOL)
        _close(got[1], want[1], "loss_reg", rtol=2e-6, atol=0.0)
        _grad_close(got[2], want[2], "d h")
        _grad_close(got[3], want[3], "d h_bal")
    else:
        torch_lowp = _oracle(out[:B], out[B:], noise, t, keep)
        ref64 = _oracle(out[:B].double(), out[B:].double(), noise.double(), t, keep)
        for i, name in enumerate(("loss_ddpm", "loss_reg", "d h", "d h_bal")):
            k = K_LOSS if i < 2 else K_GRAD
            bound = _lowp_bound(torch_lowp[i], ref64[i], k, dtype)
            err = (got[i].double() - ref64[i]).abs().max().item()
            assert err <= bound, f"{name} cuda {dtype}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.gpu
def test_cuda_keep_checked_with_checks_env_but_never_in_a_capture(monkeypatch):
    """CBDM_FAST_CHECKS=1 checks a CUDA keep's values (a sync), except inside a CUDA-graph capture,
    where a sync is illegal: the captured call runs and replays."""
    monkeypatch.setenv("CBDM_FAST_CHECKS", "1")
    h, h_bal, noise, t = (v.cuda() for v in _make((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"keep must hold values in \[0, 1\].*got 2"):
        cb_loss(h, h_bal, noise, t, T, TAU, keep=torch.tensor([1.0, 2.0], device="cuda"))
    keep = torch.ones(2, device="cuda")
    want = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep)  # also the warm-up: the kernels compile here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_cuda_keep_zero_and_graph_capture():
    B = 8
    h0, hb0, noise, t = (v.cuda() for v in _make((B, 3, 16, 16)))
    keep = torch.zeros((), device="cuda")
    h = h0.clone().requires_grad_(True)
    h_bal = hb0.clone().requires_grad_(True)
    l1, l2 = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep, backend="triton")
    (l1 + l2).backward()
    assert l2.item() == 0.0 and bool((h_bal.grad == 0).all())
    # Forward and backward captured in one CUDA graph (no host sync inside), following the documented
    # torch.cuda.graph whole-network pattern: fresh leaves, warm-up iterations on a side stream, and no
    # output of an earlier iteration (whose autograd graph would keep an AccumulateGrad node created on
    # another stream alive) left when the capture starts.
    del l1, l2
    h = h0.clone().requires_grad_(True)
    h_bal = hb0.clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            h.grad = h_bal.grad = None
            w1, w2 = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep)
            (G1 * w1 + G2 * w2).backward()
            del w1, w2
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    h.grad = h_bal.grad = None  # the captured backward allocates them from the graph's pool
    with torch.cuda.graph(graph):
        static_l1, static_l2 = cb_loss(h, h_bal, noise, t, T, TAU, keep=keep)
        (G1 * static_l1 + G2 * static_l2).backward()
    keep.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    want = _oracle(h.detach(), h_bal.detach(), noise, t, torch.ones(B, device="cuda"))
    _close(static_l1.detach(), want[0], "loss_ddpm after replay", **LOSS_TOL)
    _close(static_l2.detach(), want[1], "loss_reg after replay with keep = 1", rtol=2e-6, atol=0.0)
    _grad_close(h.grad, want[2], "d h after replay with keep = 1")
    _grad_close(h_bal.grad, want[3], "d h_bal after replay with keep = 1")
