"""ops.q_sample: the Triton kernels (through the interpreter on CPU, TRITON_INTERPRET=1) and the reference
against Schedule.q_sample, the golden fixture and float64, plus layouts, torch.compile and the errors.

Tolerances:
- float32: bit-identical to Schedule.q_sample (values and both gradients), asserted with torch.equal.
- bfloat16 / float16: bit-identical to q_sample_reference (both compute in float32 and round once), and
  the error against a float64 reference is at most K_LOWP = 2 times torch's own error for the same
  formula evaluated in that dtype (floored at K_LOWP half-ulps of the largest value). Measured ratio:
  0.45-0.65 (one rounding against torch's three).
"""

import pytest
import torch

from assert_helpers import assert_op_and_reference_raise
from cbdm_fast import ops
from cbdm_fast.ops import _common
from cbdm_fast.ops._common import batch_outer_dense, dense_batch_outer, match_layout, triton_blocker
from cbdm_fast.ops.q_sample import q_sample, q_sample_reference
from cbdm_fast.schedule import Schedule

T = 1000
K_LOWP = 2.0
SCHED = Schedule(T)
TABLES = (SCHED.sqrt_alphas_bar, SCHED.sqrt_one_minus_alphas_bar)

TRITON_CPU_REASON = (triton_blocker("q_sample", torch.empty(0)) or (None, ""))[1]
needs_triton_cpu = pytest.mark.skipif(bool(TRITON_CPU_REASON), reason=TRITON_CPU_REASON or "")
# kernel tests run on CPU tensors through the interpreter and, marked gpu, on CUDA tensors (compiled)
DEVICES = [pytest.param("cpu", marks=needs_triton_cpu, id="cpu"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _assert_equal(actual, expected, name):
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        i = int(diff.reshape(-1).argmax())
        raise AssertionError(f"{name}: not bit-identical; {int((diff > 0).sum())} of {diff.numel()} elements "
                             f"differ, max {diff.max().item():.3e} at flat index {i}: "
                             f"{actual.reshape(-1)[i].item()!r} vs {expected.reshape(-1)[i].item()!r}")


def _lowp_bound(torch_lowp, ref64, k):
    eps = torch.finfo(torch_lowp.dtype).eps
    err = (torch_lowp.double() - ref64).abs().max().item()
    return k * max(err, 0.5 * eps * ref64.abs().max().item())


def _inputs(shape, dtype=torch.float32, t=None, layout="contiguous"):
    B = shape[0]
    x0 = torch.randn(shape).to(dtype)
    noise = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    if t is None:
        t = torch.randint(0, T, (B,))
        t[0] = 0
        t[-1] = T - 1
    return x0, torch.as_tensor(t, dtype=torch.int64), noise


def _fp64(x0, t, noise):
    shape = [x0.shape[0]] + [1] * (x0.dim() - 1)
    a, s = (tab[t].view(shape) for tab in TABLES)
    return a * x0.double() + s * noise.double()


# ----------------------------------------------------------------------------- exactness (float32)

@needs_triton_cpu
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_fixture_bit_identical(fixture, backend):
    x_t = q_sample(fixture["x0"], fixture["t"], fixture["noise"], *TABLES, backend=backend)
    _assert_equal(x_t, fixture["x_t"], "x_t vs fixture")


@pytest.mark.parametrize("shape,layout", [
    ((1, 3, 8, 8), "contiguous"), ((5, 3, 7, 9), "contiguous"), ((2, 3, 33, 17), "contiguous"),  # 2 blocks/sample
    ((4, 5), "contiguous"), ((3, 2, 3, 4, 5), "contiguous"),
    ((1, 3, 8, 8), "channels_last"), ((5, 3, 7, 9), "channels_last"), ((2, 3, 33, 17), "channels_last"),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_bit_identical_values_and_grads(shape, layout, table_dtype, device):
    sched = (SCHED if device == "cpu" else Schedule(T, device=device)) if table_dtype == torch.float64 else None
    tables = tuple(tab.to(device) for tab in TABLES)
    tables = tables if sched else tuple(tab.float() for tab in tables)
    x0, t, noise = (v.to(device) for v in _inputs(shape, layout=layout))
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    x_t = q_sample(x0, t, noise, *tables, backend="triton")
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape and x_t.stride() == x0.stride()
    x0_r, noise_r = x0.detach().clone().requires_grad_(True), noise.detach().clone().requires_grad_(True)
    if sched is not None:
        ref = sched.q_sample(x0_r, t, noise_r)
    else:
        ref = q_sample_reference(x0_r, t, noise_r, *tables)
    _assert_equal(x_t.detach(), ref.detach(), "x_t")
    g = torch.randn_like(ref)
    x_t.backward(g)
    ref.backward(g)
    _assert_equal(x0.grad, x0_r.grad, "d x_0")
    _assert_equal(noise.grad, noise_r.grad, "d noise")


@needs_triton_cpu
def test_grad_only_for_inputs_that_need_it_and_expanded_grad():
    x0, t, noise = _inputs((3, 3, 5, 5))
    x0.requires_grad_(True)
    q_sample(x0, t, noise, *TABLES, backend="triton").sum().backward()  # upstream grad is an expanded 1
    assert noise.grad is None
    x0_r = x0.detach().clone().requires_grad_(True)
    SCHED.q_sample(x0_r, t, noise).sum().backward()
    _assert_equal(x0.grad, x0_r.grad, "d x_0 (only x_0 requires grad)")
    noise.requires_grad_(True)
    x0 = x0.detach()
    q_sample(x0, t, noise, *TABLES, backend="triton").pow(2).sum().backward()
    noise_r = noise.detach().clone().requires_grad_(True)
    SCHED.q_sample(x0, t, noise_r).pow(2).sum().backward()
    _assert_equal(noise.grad, noise_r.grad, "d noise (only noise requires grad)")


@needs_triton_cpu
def test_mixed_and_strided_layouts():
    x0, t, noise = _inputs((2, 3, 6, 10))
    x0_cl = x0.contiguous(memory_format=torch.channels_last)
    noise_strided = torch.randn(2, 3, 6, 20)[..., ::2]  # not dense
    out = q_sample(x0_cl, t, noise_strided, *TABLES, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_equal(out, SCHED.q_sample(x0, t, noise_strided), "x_t (channels_last x_0, strided noise)")
    out = q_sample(noise_strided, t, x0_cl, *TABLES, backend="triton")
    _assert_equal(out, SCHED.q_sample(noise_strided, t, x0), "x_t (strided x_0, channels_last noise)")


def test_layout_helpers():
    out = torch.randn(6, 3, 4, 5)
    h, hb = out[:3], out[3:]
    assert batch_outer_dense(h) and dense_batch_outer(h) is h and match_layout(hb, h) is hb
    cl = out.contiguous(memory_format=torch.channels_last)
    assert batch_outer_dense(cl[:3]) and match_layout(cl[3:], cl[:3]) is not None
    assert not batch_outer_dense(out[:, :, ::2])
    assert not batch_outer_dense(out.transpose(0, 1))  # dense, but the batch is not outermost
    assert match_layout(out, cl).is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- low precision

@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision(dtype, layout):
    x0, t, noise = _inputs((5, 3, 7, 9), dtype=dtype, layout=layout)
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    x_t = q_sample(x0, t, noise, *TABLES, backend="triton")
    assert x_t.dtype == dtype
    _assert_equal(x_t, q_sample_reference(x0, t, noise, *TABLES), f"x_t {dtype} vs reference")

    ref64 = _fp64(x0.detach(), t, noise.detach())
    shape = [x0.shape[0], 1, 1, 1]
    a_l, s_l = (tab[t].to(dtype).view(shape) for tab in TABLES)
    torch_lowp = a_l * x0.detach() + s_l * noise.detach()  # the same formula evaluated in `dtype`
    bound = _lowp_bound(torch_lowp, ref64, K_LOWP)
    err = (x_t.detach().double() - ref64).abs().max().item()
    assert err <= bound, f"x_t {dtype}: error {err:.3e} vs fp64 > {K_LOWP} x torch's {dtype} error ({bound:.3e})"

    g = torch.randn(x0.shape).to(dtype)
    x_t.backward(g)
    for name, grad, tab, a_low in (("d x_0", x0.grad, TABLES[0], a_l), ("d noise", noise.grad, TABLES[1], s_l)):
        assert grad.dtype == dtype
        g64 = tab[t].view(shape) * g.double()
        bound = _lowp_bound(a_low * g, g64, K_LOWP)
        err = (grad.double() - g64).abs().max().item()
        assert err <= bound, f"{name} {dtype}: error {err:.3e} > bound {bound:.3e}"
        _assert_equal(grad, (tab[t].float().view(shape) * g.float()).to(dtype), f"{name} {dtype} vs fp32 math")


# ----------------------------------------------------------------------------- dispatch, compile, edge cases

def test_reference_backend_equals_schedule():
    x0, t, noise = _inputs((3, 3, 4, 4))
    _assert_equal(q_sample(x0, t, noise, *TABLES, backend="reference"), SCHED.q_sample(x0, t, noise), "reference")
    assert ops.q_sample is q_sample and ops.q_sample_reference is q_sample_reference


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(_common, "triton_mode", lambda: "compiled")  # kernels built without the interpreter
    x0, t, noise = _inputs((2, 3, 4, 4))
    _assert_equal(q_sample(x0, t, noise, *TABLES), SCHED.q_sample(x0, t, noise), "auto -> reference")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        q_sample(x0, t, noise, *TABLES, backend="triton")


@needs_triton_cpu
def test_empty_batch():
    x0, noise = torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4)
    out = q_sample(x0, torch.zeros(0, dtype=torch.int64), noise, *TABLES, backend="triton")
    assert out.shape == (0, 3, 4, 4)


@needs_triton_cpu
def test_compile_fullgraph_no_graph_break():
    from torch._dynamo.utils import counters

    def fn(x0, t, noise):
        return (q_sample(x0, t, noise, *TABLES) * 2.0).sum()

    x0, t, noise = _inputs((2, 3, 4, 4))
    x0.requires_grad_(True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(x0, t, noise)
    assert explained.graph_break_count == 0, explained.break_reasons
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(x0, t, noise).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    x0_r = x0.detach().clone().requires_grad_(True)
    (SCHED.q_sample(x0_r, t, noise) * 2.0).sum().backward()
    _assert_equal(x0.grad, x0_r.grad, "d x_0 (compiled)")
    torch._dynamo.reset()


@needs_triton_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_custom_ops(layout):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    x0, t, noise = _inputs((2, 3, 4, 5), layout=layout)
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    torch.library.opcheck(torch.ops.cbdm_fast.q_sample.default, (x0, t, noise, *TABLES))
    g = torch.randn(2, 3, 4, 5)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.cbdm_fast.q_sample_backward.default, (g, t, *TABLES, *need))


# ----------------------------------------------------------------------------- errors

def _bad_cases():
    x0, t, noise = _inputs((2, 3, 4, 4))
    a, s = TABLES
    meta = torch.device("meta")
    return [
        ("x_0 not a tensor", dict(x_0=x0.tolist()), TypeError, "x_0"),
        ("x_0 int", dict(x_0=x0.long(), noise=noise.long()), TypeError, "x_0"),
        ("x_0 0-d", dict(x_0=torch.tensor(1.0), noise=torch.tensor(1.0)), ValueError, "x_0"),
        ("noise shape", dict(noise=noise[:, :2]), ValueError, "noise"),
        ("noise dtype", dict(noise=noise.double()), TypeError, "noise"),
        ("noise device", dict(noise=noise.to(meta)), ValueError, "noise"),
        ("t int32", dict(t=t.int()), TypeError, r"\bt\b"),
        ("t float", dict(t=t.float()), TypeError, r"\bt\b"),
        ("t 2-D", dict(t=t[:, None]), ValueError, r"\bt\b"),
        ("t length", dict(t=torch.zeros(3, dtype=torch.int64)), ValueError, r"\bt\b"),
        ("t device", dict(t=t.to(meta)), ValueError, r"\bt\b"),
        ("t too large", dict(t=torch.tensor([0, T])), ValueError, r"\bt\b"),
        ("t negative", dict(t=torch.tensor([-1, 0])), ValueError, r"\bt\b"),
        ("table dtype", dict(sqrt_ab=a.half()), TypeError, "sqrt_ab"),
        ("table 2-D", dict(sqrt_ab=a[None]), ValueError, "sqrt_ab"),
        ("table lengths", dict(sqrt_1m_ab=s[:-1]), ValueError, "sqrt_1m_ab"),
        ("table not a tensor", dict(sqrt_1m_ab=s.tolist()), TypeError, "sqrt_1m_ab"),
        ("table device", dict(sqrt_ab=a.to(meta)), ValueError, "sqrt_ab"),
        ("t vs short table", dict(sqrt_ab=a[:10], sqrt_1m_ab=s[:10], t=torch.tensor([0, 10])), ValueError, r"\bt\b"),
        ("backend", dict(backend="cuda"), ValueError, "backend"),
        ("triton float64", dict(x_0=x0.double(), noise=noise.double(), backend="triton"), TypeError, "float64"),
    ], dict(x_0=x0, t=t, noise=noise, sqrt_ab=a, sqrt_1m_ab=s)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])), ids=[c[0] for c in _bad_cases()[0]])
def test_bad_input_raises(case):
    cases, good = _bad_cases()
    _, override, exc, pattern = cases[case]
    assert_op_and_reference_raise(q_sample, q_sample_reference, dict(good, **override), exc, pattern)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_reference(dtype, layout):
    x0, t, noise = (v.cuda() for v in _inputs((48, 3, 32, 32), dtype=dtype, layout=layout))
    sched = SCHED.to("cuda")
    tables = (sched.sqrt_alphas_bar, sched.sqrt_one_minus_alphas_bar)
    x0.requires_grad_(True)
    out = q_sample(x0, t, noise, *tables, backend="triton")
    ref_x0 = x0.detach().clone().requires_grad_(True)
    ref = q_sample_reference(ref_x0, t, noise, *tables)
    _assert_equal(out, ref, f"x_t cuda {dtype}")  # no fma contraction: bit-identical
    if dtype == torch.float32:
        _assert_equal(out, sched.q_sample(x0.detach(), t, noise), "x_t cuda vs Schedule")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    _assert_equal(x0.grad, ref_x0.grad, f"d x_0 cuda {dtype}")


@pytest.mark.gpu
def test_cuda_bad_t_gives_nan_without_checks(monkeypatch):
    monkeypatch.delenv("CBDM_FAST_CHECKS", raising=False)
    sched = SCHED.to("cuda")
    x0, noise = torch.randn(2, 3, 4, 4, device="cuda"), torch.randn(2, 3, 4, 4, device="cuda")
    t = torch.tensor([5, T], device="cuda")
    out = q_sample(x0, t, noise, sched.sqrt_alphas_bar, sched.sqrt_one_minus_alphas_bar, backend="triton")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    monkeypatch.setenv("CBDM_FAST_CHECKS", "1")
    with pytest.raises(ValueError, match=r"\bt\b"):
        q_sample(x0, t, noise, sched.sqrt_alphas_bar, sched.sqrt_one_minus_alphas_bar)
