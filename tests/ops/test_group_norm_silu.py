"""ops.group_norm_silu: the Triton kernels against the pure-torch reference, output and every gradient
(dx, dweight, dbias, dadd), plus torch.compile without graph breaks and the documented errors.

Every kernel test is parametrised over the device: "cpu" runs the kernels on CPU tensors through the
Triton interpreter (TRITON_INTERPRET=1, what CI does), "cuda" (marked gpu, skipped without CUDA) runs
the same odd shapes with the compiled kernels on CUDA tensors. Where CUDA's group_norm cannot mix
dtypes (bf16 x, fp32 weight) torch's own low-precision error is measured on the CPU.

Error bounds, all against a float64 evaluation of the reference on the same (rounded) inputs, with
random weight, bias and upstream gradient, inputs of magnitude O(1):
  * fp32: elementwise |ours - ref64| <= 1e-5 * s + 1e-5 * |ref64| with s = max(1, max|ref64|), and for
    dadd (a sum of L = H*W values of dx, which cancels to ~0 when a group has one channel)
    s = max(1, max|ref64|, sqrt(L) * max|ref64 dx|). Measured (3 seeds, CASES): max error / s at most
    4.6e-7 (y, dx, dweight, dbias) and 1.4e-7 (dadd).
  * bf16, fp16: max|ours - ref64| <= K_LOWP = 3 times torch's own error at that precision (the
    reference run in bf16 / fp16 on the CPU) against ref64, that error floored at half an ulp of
    max|ref64| (assert_helpers.lowp_bound). Measured ratios (3 seeds, CASES): at most 1.63 for bf16
    (y 1.62, dx 1.63, dadd 1.33, dweight 1.00, dbias 0.72) and 0.73 for fp16; with fp32 weights,
    dweight / dbias are ~1e4 times more accurate than torch's bf16 chain, which rounds z to bf16.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from assert_helpers import assert_close, assert_within_torch_error
from cbdm_fast import ops
from cbdm_fast.ops import _common, group_norm_silu, group_norm_silu_reference

gns_mod = importlib.import_module("cbdm_fast.ops.group_norm_silu")  # the module (ops.group_norm_silu is the function)

pytestmark = pytest.mark.usefixtures("one_thread")

K_LOWP = 3.0
FP32_TOL = 1e-5

_MODE = _common.triton_mode()
needs_kernels = pytest.mark.skipif(
    _MODE != "interpreted",
    reason="the Triton kernels run on CPU tensors only through the interpreter: "
           "run with TRITON_INTERPRET=1 (set before triton is imported)")
needs_compiled = pytest.mark.skipif(
    _MODE != "compiled", reason="needs the compiled Triton kernels (triton importable, TRITON_INTERPRET unset)")

# The kernel tests run twice over: on CPU tensors through the interpreter (CI), and on CUDA tensors with
# the compiled kernels (marked gpu: skipped without CUDA; the CPU variants skip there instead, as the
# interpreter is off where CUDA is available).
DEVICES = [pytest.param("cpu", marks=needs_kernels, id="cpu"),
           pytest.param("cuda", marks=[pytest.mark.gpu, needs_compiled], id="cuda")]


# ----------------------------------------------------------------------------------------------
# helpers


def make_case(N, G, cg, spatial, *, add, layout="nchw", dtype=torch.float32, wdtype=None, device="cpu",
              offset=0.5):
    """float64 master inputs rounded to dtype (so the float64 reference sees exactly our inputs)."""
    C = G * cg
    shape = (N, C) + tuple(spatial)
    f64 = dict(dtype=torch.float64, device=device)
    wdtype = wdtype or dtype
    x = (torch.randn(shape, **f64) * 2 + offset).to(dtype)
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last for any rank
    w = torch.randn(C, **f64).to(wdtype)
    b = torch.randn(C, **f64).to(wdtype)
    a = torch.randn(N, C, **f64).to(dtype) if add else None
    dy = torch.randn(shape, **f64).to(dtype)  # NCHW-contiguous: with layout "cl" the backward converts it
    return x, w, b, a, dy


def run(fn, x, w, b, a, dy, G, act, dtype=None, wdtype=None):
    """[y, dx, dweight, dbias(, dadd)] of fn on copies of the inputs cast to dtype / wdtype."""
    dtype = dtype or x.dtype
    wdtype = wdtype or w.dtype
    xs = x.detach().to(dtype).requires_grad_()
    ws = w.detach().to(wdtype).requires_grad_()
    bs = b.detach().to(wdtype).requires_grad_()
    as_ = a.detach().to(dtype).requires_grad_() if a is not None else None
    y = fn(xs, ws, bs, G, add=as_, act=act)
    y.backward(dy.to(dtype))
    return [y, xs.grad, ws.grad, bs.grad] + ([as_.grad] if a is not None else [])


NAMES = ["y", "dx", "dweight", "dbias", "dadd"]
triton_op = functools.partial(group_norm_silu, backend="triton")


def check_against_reference(x, w, b, a, dy, G, act, op=triton_op):
    """Ours vs the float64 reference with the bounds of the module docstring; returns ours."""
    ours = run(op, x, w, b, a, dy, G, act)
    ref64 = run(group_norm_silu_reference, x, w, b, a, dy, G, act, torch.float64, torch.float64)
    # dtypes and layouts: y and dx like x, dweight / dbias like weight / bias, dadd like add
    assert ours[0].dtype == x.dtype and ours[0].stride() == torch.empty_like(x).stride()
    assert ours[1].dtype == x.dtype
    assert ours[2].dtype == w.dtype and ours[3].dtype == b.dtype
    if x.dtype == torch.float32:
        L = x[0, 0].numel()
        for name, o, r in zip(NAMES, ours, ref64):
            scale = max(1.0, float(r.detach().abs().max()))
            if name == "dadd":  # a sum of L values of dx that may cancel to ~0
                scale = max(scale, L ** 0.5 * float(ref64[1].detach().abs().max()))
            assert_close(o, r, atol=FP32_TOL * scale, rtol=FP32_TOL, name=name)
    else:
        if x.is_cuda and w.dtype != x.dtype:  # CUDA's group_norm wants one dtype: torch's error from the CPU
            cpu = [None if v is None else v.cpu() for v in (x, w, b, a, dy)]
            torch_lowp = run(group_norm_silu_reference, *cpu, G, act)
        else:
            torch_lowp = run(group_norm_silu_reference, x, w, b, a, dy, G, act)
        for name, o, t, r in zip(NAMES, ours, torch_lowp, ref64):
            assert_within_torch_error(o, t, r, K_LOWP, name=name)
    return ours


# ----------------------------------------------------------------------------------------------
# the kernels against the reference

# (N, G, channels per group, spatial, add, act, layout, dtype, weight dtype): a covering subset of
# cg in {1, 3, 8} x H*W in {1, 7x7, 17x17} x N in {1, 5} x add x act x layout x dtype.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    (5, 2, 1, (7, 7), True, True, "nchw", F32, F32),
    (1, 3, 3, (17, 17), False, True, "cl", F32, F32),
    (5, 2, 8, (1, 1), True, False, "cl", F32, F32),
    (5, 2, 3, (1, 1), False, True, "nchw", F32, F32),
    (1, 2, 8, (17, 17), True, True, "nchw", F32, F32),
    (5, 4, 1, (17, 17), True, False, "cl", F32, F32),
    (5, 2, 3, (7, 7), True, True, "cl", BF16, BF16),
    (1, 2, 8, (7, 7), False, False, "nchw", BF16, BF16),
    (5, 2, 8, (17, 17), True, True, "cl", BF16, F32),
    (5, 3, 1, (1, 1), True, True, "nchw", BF16, BF16),
    (1, 2, 3, (17, 17), True, False, "nchw", BF16, F32),
    (5, 2, 1, (17, 17), False, True, "nchw", BF16, BF16),
    (5, 2, 8, (7, 7), True, True, "cl", F16, F16),
]


def _case_id(c):
    N, G, cg, sp, add, act, layout, dt, wdt = c
    return (f"N{N}-G{G}-cg{cg}-{'x'.join(map(str, sp))}-{'add' if add else 'noadd'}-{'silu' if act else 'noact'}"
            f"-{layout}-{str(dt)[6:]}-w{str(wdt)[6:]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case, device):
    N, G, cg, spatial, add, act, layout, dtype, wdtype = case
    x, w, b, a, dy = make_case(N, G, cg, spatial, add=add, layout=layout, dtype=dtype, wdtype=wdtype, device=device)
    check_against_reference(x, w, b, a, dy, G, act)


MULTI_TILE = [  # (G, cg, layout, dtype, act, MAX_TILE, MAX_BLOCK_C): groups walked in several tiles
    (2, 6, "cl", F32, True, 128, 4),      # channel chunks of 4 + 2 (masked), l tiles of 32 over 289
    (2, 3, "nchw", BF16, False, 64, 2),   # channel chunks of 2 + 1, l tiles of 32
    (3, 8, "nchw", F32, True, 256, 64),   # all 8 channels, l tiles of 32
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,cg,layout,dtype,act,max_tile,max_block_c", MULTI_TILE)
def test_multi_tile_matches_reference(monkeypatch, G, cg, layout, dtype, act, max_tile, max_block_c, device):
    """The loop paths (per-lane Welford + combine, two-pass backward) on small shapes, forced by
    lowering the tile limits; x offset by 50 standard deviations to stress the statistics."""
    K = gns_mod._kernels()
    monkeypatch.setattr(K, "MAX_TILE", max_tile)
    monkeypatch.setattr(K, "MAX_BLOCK_C", max_block_c)
    assert not K.block_sizes(cg, 17 * 17)[3]
    x, w, b, a, dy = make_case(2, G, cg, (17, 17), add=True, layout=layout, dtype=dtype, offset=100.0, device=device)
    check_against_reference(x, w, b, a, dy, G, act)


GROUPED = [  # (N, G, cg, spatial, dtype, act, MAX_TILE): channels-last programs holding several groups
    (2, 3, 3, (7, 7), F32, True, 8192),       # 4 groups of 4 slots per program: 1 group and 3 slots masked
    (1, 5, 2, (17, 17), BF16, False, 64),     # 8 groups per program, l tiles of 4: the multi-tile path
    (3, 4, 1, (5, 3), F32, True, 8192),       # one channel per group, 4 groups per program
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,G,cg,spatial,dtype,act,max_tile", GROUPED)
def test_groups_per_program(monkeypatch, N, G, cg, spatial, dtype, act, max_tile, device):
    """Channels-last with several groups per program (GPP > 1, forced on small shapes)."""
    K = gns_mod._kernels()
    monkeypatch.setattr(K, "MAX_TILE", max_tile)
    monkeypatch.setattr(K, "MIN_PROGRAMS", 1)
    monkeypatch.setattr(K, "ROW_BYTES", 1024)
    L = spatial[0] * spatial[1]
    gpp, _, _, one_tile = K.block_sizes(cg, L, N=N, G=G, channels_last=True, itemsize=dtype.itemsize)
    assert gpp > 1 and one_tile == (max_tile == 8192)
    x, w, b, a, dy = make_case(N, G, cg, spatial, add=True, layout="cl", dtype=dtype, offset=20.0, device=device)
    check_against_reference(x, w, b, a, dy, G, act)


ROWS = [  # (N, G, cg, spatial, add, act, dtype, wdtype, ROWS_TILE, MAX_ROWS_BLOCK_C, offset): the "rows"
    # strategy for channels-last (tiles of whole rows, split reductions), several tiles per sample
    (2, 3, 3, (7, 7), True, True, F32, F32, 64, 512, 20.0),      # 7 tiles of 8 rows, the last one of 1
    (3, 2, 8, (17, 17), True, False, F32, F32, 64, 4, 50.0),     # 4 channel blocks of 4, tiles of 16 rows
    (1, 4, 1, (5, 3), False, True, F32, F32, 8192, 512, 0.5),    # one channel per group, one tile
    (2, 2, 3, (17, 17), True, True, BF16, F32, 128, 8, 10.0),    # bf16, fp32 weights, 1 channel masked
    (2, 3, 8, (7, 7), False, True, BF16, BF16, 256, 512, 0.5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,G,cg,spatial,add,act,dtype,wdtype,tile,max_block_c,offset", ROWS)
def test_rows_strategy_matches_reference(monkeypatch, N, G, cg, spatial, add, act, dtype, wdtype, tile,
                                         max_block_c, offset, device):
    K = gns_mod._kernels()
    rows = importlib.import_module("cbdm_fast.kernels.group_norm_silu_rows")
    monkeypatch.setattr(K, "STRATEGY", "rows")
    monkeypatch.setattr(rows, "ROWS_TILE", tile)
    monkeypatch.setattr(rows, "MAX_ROWS_BLOCK_C", max_block_c)
    L = spatial[0] * spatial[1]
    block_l, _, S, blocks, _ = rows.rows_config(G * cg, L)
    assert (S > 1) == (tile < 8192) and (blocks > 1) == (max_block_c < G * cg)
    x, w, b, a, dy = make_case(N, G, cg, spatial, add=add, layout="cl", dtype=dtype, wdtype=wdtype, device=device,
                               offset=offset)
    check_against_reference(x, w, b, a, dy, G, act)


def test_unknown_strategy_is_named(monkeypatch):
    K = gns_mod._kernels()
    if K is None:
        pytest.skip("the Triton kernels cannot be imported here")
    monkeypatch.setattr(K, "STRATEGY", "columns")
    x = torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="STRATEGY must be one of"):
        K.group_norm_silu_fwd(x, torch.ones(4), torch.zeros(4), None, 2, 1e-5, True, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial,layout", [((10,), "nchw"), ((3, 4, 5), "cl"), ((2, 3, 1, 3), "nchw")])
def test_other_ranks(spatial, layout, device):
    """(N, C, L), (N, C, D, H, W) channels-last and a 6-D input."""
    x, w, b, a, dy = make_case(3, 2, 3, spatial, add=True, layout=layout, device=device)
    check_against_reference(x, w, b, a, dy, 2, True)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_is_copied(device):
    """x neither NCHW- nor channels-last-contiguous (a slice) is accepted: copied to NCHW first."""
    x, w, b, a, dy = make_case(2, 2, 3, (7, 14), add=True, device=device)
    xs = x[..., ::2]
    assert not xs.is_contiguous() and not xs.movedim(1, -1).is_contiguous()
    ours = check_against_reference(xs, w, b, a, dy[..., ::2].contiguous(), 2, True)
    assert ours[0].is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_auto_uses_the_kernels_and_backward_is_deterministic(monkeypatch, device):
    K = gns_mod._kernels()
    calls = []
    for fn in ("group_norm_silu_fwd", "group_norm_silu_bwd"):
        orig = getattr(K, fn)
        monkeypatch.setattr(K, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    x, w, b, a, dy = make_case(5, 2, 3, (7, 7), add=True, layout="cl", device=device)
    first = run(group_norm_silu, x, w, b, a, dy, 2, True)
    assert calls == ["group_norm_silu_fwd", "group_norm_silu_bwd"]
    second = run(group_norm_silu, x, w, b, a, dy, 2, True)
    for name, p, q in zip(NAMES, first, second):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_any_layout(device):
    """dy with zero strides (the gradient of y.sum()) and dy channels-last for an NCHW x."""
    x, w, b, a, _ = make_case(2, 2, 3, (5, 5), add=True, device=device)
    for dy in (torch.ones((), device=device).expand(x.shape),
               torch.randn_like(x).to(memory_format=torch.channels_last)):
        ours = run(triton_op, x, w, b, a, dy, 2, True)
        ref64 = run(group_norm_silu_reference, x, w, b, a, dy, 2, True, torch.float64, torch.float64)
        for name, o, r in zip(NAMES, ours, ref64):
            assert_close(o, r, atol=1e-5 * max(1.0, float(r.detach().abs().max())), rtol=1e-5, name=name)


def test_reference_is_the_unfused_model_chain():
    """backend='reference' is bit-identical to the UNet's ResBlock chain (h + temb; nn.GroupNorm; Swish),
    forward and backward, in fp32 and bf16."""
    from cbdm_fast.model import Swish
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, a, dy = make_case(3, 2, 4, (5, 5), add=True, dtype=dtype, layout="cl")
        gn = torch.nn.GroupNorm(2, 8).to(dtype)
        with torch.no_grad():
            gn.weight.copy_(w)
            gn.bias.copy_(b)
        chain = torch.nn.Sequential(gn, Swish())
        x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
        y1 = chain(x1 + a1[:, :, None, None])
        y1.backward(dy)
        x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
        w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
        y2 = group_norm_silu(x2, w2, b2, 2, add=a2, backend="reference")
        y2.backward(dy)
        for name, p, q in [("y", y1, y2), ("dx", x1.grad, x2.grad), ("dadd", a1.grad, a2.grad),
                           ("dweight", gn.weight.grad, w2.grad), ("dbias", gn.bias.grad, b2.grad)]:
            assert torch.equal(p, q), f"{name} ({dtype})"


def test_custom_op_without_kernels_runs_the_reference(monkeypatch):
    """Where the kernels cannot run, torch.ops.cbdm_fast.group_norm_silu computes y with the reference
    (bit-identical) and its backward with the fp32 torch transcription of the kernel's formulas."""
    monkeypatch.setattr(_common, "triton_mode", lambda: "none")
    x, w, b, a, dy = make_case(2, 2, 3, (5, 5), add=True, layout="cl")

    def op(x, w, b, G, add=None, act=True):
        return torch.ops.cbdm_fast.group_norm_silu(x, w, b, add, G, 1e-5, act)[0]

    ours = check_against_reference(x, w, b, a, dy, 2, True, op=op)
    assert torch.equal(ours[0], group_norm_silu_reference(x, w, b, 2, add=a))
    # the public op: auto falls back to the reference, backend="triton" refuses
    assert torch.equal(group_norm_silu(x, w, b, 2, add=a), ours[0])
    with pytest.raises(RuntimeError, match="Triton kernels cannot be imported"):
        group_norm_silu(x, w, b, 2, add=a, backend="triton")


def test_triton_backend_refusals(monkeypatch):
    x, w, b, a, _ = make_case(2, 2, 3, (5, 5), add=False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        group_norm_silu(x.double(), w.double(), b.double(), 2, backend="triton")
    monkeypatch.setattr(_common, "triton_mode", lambda: "compiled")  # triton without the interpreter
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_norm_silu(x, w, b, 2, backend="triton")
    # float64 under auto: the reference
    assert torch.equal(group_norm_silu(x.double(), w.double(), b.double(), 2),
                       group_norm_silu_reference(x.double(), w.double(), b.double(), 2))


# ----------------------------------------------------------------------------------------------
# torch.compile


@needs_kernels
def test_compile_fullgraph_no_graph_breaks():
    import torch._dynamo

    def f(x, w, b, a):
        h = group_norm_silu(x * 2, w, b, 2, add=a)
        return group_norm_silu(h, w, b, 2, act=False).square().mean()

    x, w, b, a, _ = make_case(2, 2, 3, (5, 5), add=True, layout="cl")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, w, b, a)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        ins = [t.clone().requires_grad_() for t in (x, w, b, a)]
        out = fn(*ins)
        out.backward()
        results.append([out] + [t.grad for t in ins])
    torch._dynamo.reset()
    for name, p, q in zip(["out", "dx", "dweight", "dbias", "dadd"], *results):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------------------------
# errors


def _bad_inputs():
    x = torch.randn(2, 6, 3, 3)
    w, b, a = torch.randn(6), torch.randn(6), torch.randn(2, 6)
    ok = dict(x=x, weight=w, bias=b, num_groups=2, eps=1e-5, add=a, act=True)
    cases = [
        ("x", TypeError, dict(x=x.numpy())),
        ("x", ValueError, dict(x=torch.randn(2, 6))),
        ("x", TypeError, dict(x=x.to(torch.int32))),
        ("num_groups", ValueError, dict(num_groups=4)),          # 6 channels not divisible by 4
        ("num_groups", ValueError, dict(num_groups=0)),
        ("num_groups", ValueError, dict(num_groups=-2)),
        ("num_groups", TypeError, dict(num_groups=2.0)),
        ("num_groups", TypeError, dict(num_groups=True)),
        ("weight", ValueError, dict(weight=torch.randn(3))),
        ("weight", ValueError, dict(weight=torch.randn(6, 1))),
        ("bias", ValueError, dict(bias=torch.randn(7))),
        ("weight", TypeError, dict(weight=torch.randn(6, dtype=torch.float64))),
        ("bias", TypeError, dict(bias=[0.0] * 6)),
        ("add", ValueError, dict(add=torch.randn(2, 6, 1, 1))),
        ("add", ValueError, dict(add=torch.randn(3, 6))),
        ("add", TypeError, dict(add=a.to(torch.bfloat16))),
        ("eps", ValueError, dict(eps=0.0)),
        ("eps", ValueError, dict(eps=-1e-5)),
        ("eps", ValueError, dict(eps=float("nan"))),
        ("eps", TypeError, dict(eps="1e-5")),
        ("act", TypeError, dict(act=1)),
    ]
    cases += [  # a second device that always exists: meta
        ("weight", ValueError, dict(weight=torch.randn(6, device="meta"))),
        ("add", ValueError, dict(add=torch.randn(2, 6, device="meta")))]
    return ok, cases


_OK, _BAD = _bad_inputs()


@pytest.mark.parametrize("fn", [group_norm_silu, group_norm_silu_reference], ids=["op", "reference"])
@pytest.mark.parametrize("arg,exc,change", _BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(_BAD)])
def test_bad_inputs_raise(fn, arg, exc, change):
    kwargs = {**_OK, **change}
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        fn(**kwargs)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        group_norm_silu(**_OK, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        group_norm_silu(**_OK, backend=None)


def test_exported():
    assert ops.group_norm_silu is group_norm_silu
    assert ops.group_norm_silu_reference is group_norm_silu_reference


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels at the UNet's training shapes


@pytest.mark.gpu
@pytest.mark.parametrize("N,C,H", [(96, 256, 16), (96, 128, 32), (7, 96, 17)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_training_shapes(N, C, H, dtype):
    x, w, b, a, dy = make_case(N, 32, C // 32, (H, H), add=True, layout="cl", dtype=dtype,
                               wdtype=torch.float32, device="cuda")
    check_against_reference(x, w, b, a, dy, 32, True)


@pytest.mark.gpu
def test_cuda_compile_inductor_no_graph_breaks():
    import torch._dynamo

    def f(x, w, b, a):
        return group_norm_silu(x, w, b, 32, add=a).float().square().mean()

    x, w, b, a, _ = make_case(8, 32, 4, (16, 16), add=True, layout="cl", dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x, w, b, a).graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, w, b, a)
    torch.testing.assert_close(got, f(x, w, b, a), rtol=1e-5, atol=1e-6)
