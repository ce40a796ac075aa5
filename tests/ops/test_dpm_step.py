"""ops.dpm_step: the C++ extension (CPU here, CUDA on a GPU) against the pure-torch reference, the
reference against the DPM-Solver++ update written out by hand, and the documented errors.

Tolerances: extension vs reference on CPU in fp32 is bit-identical (same operation order, no fma
contraction) and asserted with torch.equal; the reference vs the float64 formula to 1e-5 relative
(float32 rounding of x0 ~ x / alpha_s, up to ~150 x at t = 999). CUDA vs reference: fp32 rtol = atol =
1e-6, bf16 / fp16 one unit of the output dtype."""
import pytest
import torch
import torch.nn.functional as F

from assert_helpers import assert_compiles_whole
from cbdm_fast import ops
from cbdm_fast.ops import _extension, dpm_step, dpm_step_reference
from cbdm_fast.samplers.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps
from cbdm_fast.schedule import Schedule

FP32_TOL = dict(rtol=1e-6, atol=1e-6)
M = 12  # < 15: the table has a first-order first AND last row


@pytest.fixture(scope="module")
def coefs():
    schedule = Schedule(1000)
    return dpm_solver_coefficients(schedule, dpm_solver_timesteps(schedule, M), omega=1.6).float()


def make_inputs(shape, device="cpu", dtype=torch.float32, guided=True):
    x, eps_c, eps_u, x0_prev = (torch.randn(shape, device=device).to(dtype) for _ in range(4))
    return x, eps_c, eps_u if guided else None, x0_prev


def run(backend, x, eps_c, eps_u, x0_prev, coefs, k, clip=False):
    """The step on copies: (x_new, x0) as the op writes them."""
    x, x0_prev = x.clone(), x0_prev.clone()
    dpm_step(x, eps_c, eps_u, x0_prev, coefs, torch.tensor([k], device=x.device), clip_x0=clip, backend=backend)
    return x, x0_prev


@pytest.mark.parametrize("k", [0, 1, 5, M - 1])  # first order, second order, the lower-order last row
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no_eps_u"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_cpu_extension_matches_reference_bitwise(ext, coefs, k, guided, clip):
    inputs = make_inputs((4, 3, 7, 5), guided=guided)  # 105 elements per sample: no multiple of anything
    a = run("extension", *inputs, coefs, k, clip)
    b = run("reference", *inputs, coefs, k, clip)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cpu_extension_parallel_path(ext, coefs):
    inputs = make_inputs((2, 3, 1024, 1024))  # past the OpenMP threshold
    for x, y in zip(run("extension", *inputs, coefs, 3), run("reference", *inputs, coefs, 3)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("k", [0, 4, M - 1])
def test_reference_is_the_dpm_solver_update_by_hand(coefs, k):
    """x0 = x / alpha_s - sigma_s / alpha_s eps (guided eps), x_new = a x + b x0 + c x0_prev, in float64."""
    x, eps_c, eps_u, x0_prev = make_inputs((3, 2, 5))
    w, inv_alpha, s_over_a, a, b, c = coefs[k].double().tolist()
    eps = eps_c.double() + w * (eps_c.double() - eps_u.double())
    x0 = x.double() * inv_alpha - s_over_a * eps
    want = a * x.double() + b * x0 + c * x0_prev.double()
    got, got_x0 = run("reference", x, eps_c, eps_u, x0_prev, coefs, k)
    torch.testing.assert_close(got_x0.double(), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_first_order_row_does_not_read_the_history(request, coefs, backend):
    """Row 0 (c = 0): x0_prev may hold anything, NaN included (an uninitialised buffer)."""
    if backend == "extension":
        request.getfixturevalue("ext")
    x, eps_c, eps_u, _ = make_inputs((2, 6))
    nan = torch.full_like(x, float("nan"))
    got, x0 = run(backend, x, eps_c, eps_u, nan, coefs, 0)
    assert coefs[0, 5] == 0 and torch.isfinite(got).all() and torch.isfinite(x0).all()
    assert torch.equal(got, run(backend, x, eps_c, eps_u, torch.zeros_like(x), coefs, 0)[0])


def test_clip_bounds_x0_and_is_off_by_default(coefs):
    x, eps_c, eps_u, x0_prev = make_inputs((2, 50))
    x = x * 3
    plain = run("reference", x, eps_c, eps_u, x0_prev, coefs, 4)[1]
    clipped = run("reference", x, eps_c, eps_u, x0_prev, coefs, 4, clip=True)[1]
    assert plain.abs().max() > 1 and torch.equal(clipped, plain.clamp(-1, 1))


def test_the_op_writes_in_place_and_returns_nothing(coefs):
    x, eps_c, eps_u, x0_prev = make_inputs((2, 6))
    want = run("reference", x, eps_c, eps_u, x0_prev, coefs, 2)
    ptrs = (x.data_ptr(), x0_prev.data_ptr())
    assert dpm_step(x, eps_c, eps_u, x0_prev, coefs, torch.tensor([2])) is None
    assert (x.data_ptr(), x0_prev.data_ptr()) == ptrs and torch.equal(x, want[0]) and torch.equal(x0_prev, want[1])


def test_bfloat16_io_on_the_reference(coefs):
    """Any floating dtype on the reference: float32 math, stored back in the I/O dtype."""
    inputs = make_inputs((2, 3, 4))
    half = [None if v is None else v.bfloat16() for v in inputs]
    got = run("auto", *half, coefs, 3)  # the CPU extension takes float32 only: auto falls back
    want = run("reference", *[v.float() for v in half], coefs, 3)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0].bfloat16())


# ---------------------------------------------------------------- torch.compile (the custom op)

def _guided_step(coefs, device="cpu"):
    """A guided sampling step: two passes of a tiny conditional "network", then dpm_step on copies."""
    weight, emb = torch.randn(3, 3, 3, 3, device=device) * 0.1, torch.randn(8, 3, 1, 1, device=device)

    def step(x, x0_prev, y, k):
        x, x0_prev = x.clone(), x0_prev.clone()
        eps_u = F.conv2d(x, weight, padding=1)
        dpm_step(x, eps_u + emb[y], eps_u, x0_prev, coefs, k)
        return torch.stack([x, x0_prev])

    x, _, _, x0_prev = make_inputs((8, 3, 8, 8), device=device)
    return step, (x, x0_prev, torch.arange(8, device=device), torch.tensor([3], device=device))


def test_compile_fullgraph_guided_step(ext, coefs):
    """torch.compile(fullgraph=True): one graph, no break, the extension reached through the mutating custom
    op cbdm_fast::dpm_step, the result bit-identical to eager."""
    step, args = _guided_step(coefs)
    with torch.no_grad():
        assert_compiles_whole(step, args, "cbdm_fast.dpm_step")


@pytest.mark.parametrize("guided", [True, False])
def test_opcheck_custom_op(ext, coefs, guided):
    """Schema (x and x0_prev mutated), fake implementation and AOT dispatch of torch.ops.cbdm_fast.dpm_step."""
    x, eps_c, eps_u, x0_prev = make_inputs((8, 2, 5), guided=guided)
    torch.library.opcheck(torch.ops.cbdm_fast.dpm_step.default, (x, eps_c, eps_u, x0_prev, coefs, torch.tensor([4]),
                                                                 False))


# ---------------------------------------------------------------- errors

def _args(coefs):
    x, eps_c, eps_u, x0_prev = make_inputs((3, 2, 5))
    return dict(x=x, eps_c=eps_c, eps_u=eps_u, x0_prev=x0_prev, coefs=coefs, step=torch.tensor([1]))


BAD = {  # name -> (change to the arguments, exception, message fragment)
    "eps_c_shape": (lambda a: a.update(eps_c=a["eps_c"][:, :1]), ValueError, "eps_c has shape"),
    "eps_u_dtype": (lambda a: a.update(eps_u=a["eps_u"].double()), TypeError, "eps_u has dtype"),
    "x0_prev_shape": (lambda a: a.update(x0_prev=a["x0_prev"][:2]), ValueError, "x0_prev has shape"),
    "x0_prev_none": (lambda a: a.update(x0_prev=None), TypeError, "x0_prev must be a torch.Tensor"),
    "x0_prev_is_x": (lambda a: a.update(x0_prev=a["x"]), ValueError, "x and x0_prev are the same memory"),
    "x_int": (lambda a: a.update(x=a["x"].long()), TypeError, "x must have a floating dtype"),
    "coefs_float64": (lambda a: a.update(coefs=a["coefs"].double()), TypeError, "coefs must be float32"),
    "coefs_5_columns": (lambda a: a.update(coefs=a["coefs"][:, :5].contiguous()), ValueError,
                        "coefs must have shape .M, 6."),
    "coefs_empty": (lambda a: a.update(coefs=a["coefs"][:0]), ValueError, "coefs must have shape .M, 6."),
    "coefs_noncontig": (lambda a: a.update(coefs=a["coefs"].t().contiguous().t()), ValueError,
                        "coefs must be contiguous"),
    "coefs_device": (lambda a: a.update(coefs=a["coefs"].to("meta")), ValueError, "coefs is on meta"),
    "step_int": (lambda a: a.update(step=1), TypeError, "step must be a torch.Tensor"),
    "step_int32": (lambda a: a.update(step=a["step"].int()), TypeError, "step must be an int64 tensor"),
    "step_shape": (lambda a: a.update(step=torch.tensor([1, 2])), ValueError, r"step must have shape \(1,\)"),
    "step_negative": (lambda a: a.update(step=torch.tensor([-1])), ValueError, r"step must be in \[0, M\)"),
    "step_past_end": (lambda a: a.update(step=torch.tensor([M])), ValueError, rf"\[0, {M}\), got {M}"),
    "step_device": (lambda a: a.update(step=a["step"].to("meta")), ValueError, "step is on meta"),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "extension", "reference_fn"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(coefs, case, backend):
    change, exc, msg = BAD[case]
    a = _args(coefs)
    change(a)
    before = a["x"].clone() if isinstance(a["x"], torch.Tensor) else None
    fn = dpm_step_reference if backend == "reference_fn" else dpm_step
    kw = {} if backend == "reference_fn" else {"backend": backend}
    with pytest.raises(exc, match=msg):
        fn(**a, **kw)
    assert before is None or torch.equal(a["x"], before)  # nothing written


@pytest.mark.parametrize("name", ["x", "eps_c", "eps_u", "x0_prev"])
def test_non_contiguous_rejected_on_extension_path_only(ext, coefs, name):
    a = _args(coefs)
    a[name] = a[name].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=f"{name} is not contiguous"):
        dpm_step(**a, backend="extension")
    b = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    dpm_step(**a)
    dpm_step(**b, backend="reference")
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["x0_prev"], b["x0_prev"])


def test_empty_batch(coefs):
    x = torch.empty(0, 3)
    assert dpm_step(x, x, None, torch.empty(0, 3), coefs, torch.tensor([0])) is None


def _raw(a, null=None, B=None, N=None, M_=None, dtype=0):
    p = dict(x=a["x"].data_ptr(), eps_c=a["eps_c"].data_ptr(), eps_u=a["eps_u"].data_ptr(),
             x0_prev=a["x0_prev"].data_ptr(), coefs=a["coefs"].data_ptr(), step=a["step"].data_ptr())
    if null:
        p[null] = 0
    B = a["x"].shape[0] if B is None else B
    N = a["x"][0].numel() if N is None else N
    M_ = a["coefs"].shape[0] if M_ is None else M_
    return (*p.values(), B, N, M_, False, dtype)


@pytest.mark.parametrize("kw,msg", [
    (dict(B=0), "B .batch size. must be > 0"),
    (dict(N=0), "N .elements per sample. must be > 0"),
    (dict(M_=0), "M .rows of coefs. must be > 0"),
    (dict(dtype=2), "only float32"),
    (dict(null="x"), "x is a null pointer"),
    (dict(null="x0_prev"), "x0_prev is a null pointer"),
    (dict(null="coefs"), "coefs is a null pointer"),
    (dict(null="step"), "step is a null pointer"),
    (dict(M_=1), r"step = 1 is outside \[0, M\) with M = 1"),
])
def test_cpp_validation(ext, coefs, kw, msg):
    a = _args(coefs)  # keeps the tensors behind the raw pointers alive
    before = a["x"].clone(), a["x0_prev"].clone()
    with pytest.raises(ValueError, match=msg):
        ext.dpm_step_cpu(*_raw(a, **kw))
    assert torch.equal(a["x"], before[0]) and torch.equal(a["x0_prev"], before[1])  # nothing written


def test_cpp_rejects_x_as_its_own_history(ext, coefs):
    a = _args(coefs)
    a["x0_prev"] = a["x"]
    with pytest.raises(ValueError, match="x and x0_prev are the same buffer"):
        ext.dpm_step_cpu(*_raw(a))


def test_cpp_cuda_entry_raises_without_gpu(ext, coefs):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="dpm_step_cuda"):
        ext.dpm_step_cuda(*_raw(_args(coefs)), 0, 0)  # device 0, default stream


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,guided,clip", [(0, True, False), (5, False, True), (M - 2, True, True)])
def test_cuda_extension_matches_reference(ext, coefs, dtype, k, guided, clip):
    if not _extension.cuda_available():
        pytest.fail(f"GPU present but the extension cannot use it: {_extension.cuda_error()}")
    cc = coefs.cuda()
    inputs = make_inputs((8, 3, 16, 16), device="cuda", dtype=dtype, guided=guided)
    got = run("extension", *inputs, cc, k, clip)
    ref = run("reference", *inputs, cc, k, clip)
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                                         atol=1e-3)
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **tol)
    cpu = run("reference", *[None if v is None else v.cpu().float() for v in inputs], coefs, k, clip)
    for g, c in zip(got, cpu):
        torch.testing.assert_close(g.float().cpu(), c, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32
                                                          else tol))


@pytest.mark.gpu
def test_cuda_bad_step_gives_nan_not_a_crash(ext, coefs):
    x, eps_c, eps_u, x0_prev = make_inputs((2, 40), device="cuda")
    dpm_step(x, eps_c, eps_u, x0_prev, coefs.cuda(), torch.tensor([M + 5], device="cuda"), backend="extension")
    torch.cuda.synchronize()
    assert torch.isnan(x).all() and torch.isnan(x0_prev).all()


@pytest.mark.gpu
def test_cuda_graph_replays_every_step_from_the_device_counter(ext, coefs):
    """One captured step (dpm_step at row k, then k += 1) replayed M times == M eager reference steps."""
    cc = coefs.cuda()
    x, eps_c, eps_u, x0_prev = make_inputs((4, 3, 8, 8), device="cuda")
    ref_x, ref_h = x.clone(), x0_prev.clone()
    for k in range(M):
        dpm_step(ref_x, eps_c, eps_u, ref_h, cc, torch.tensor([k], device="cuda"), backend="reference")
    k = torch.zeros(1, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as FastSampler does
        dpm_step(x.clone(), eps_c, eps_u, x0_prev.clone(), cc, k, backend="extension")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dpm_step(x, eps_c, eps_u, x0_prev, cc, k, backend="extension")
        k.add_(1)
    k.zero_()  # (capturing records the kernels without running them: x and x0_prev are unchanged)
    for _ in range(M):
        graph.replay()
    torch.cuda.synchronize()
    assert int(k) == M
    torch.testing.assert_close(x, ref_x, **FP32_TOL)
    torch.testing.assert_close(x0_prev, ref_h, **FP32_TOL)
