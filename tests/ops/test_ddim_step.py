"""ops.ddim_step: the C++ extension (CPU here, CUDA on a GPU) against the pure-torch reference, the
reference against DDPM's ancestral step (eta = 1, t_prev = t - 1) and the documented errors.

Tolerances: extension vs reference on CPU in fp32 is bit-identical (same operation order, per-sample
coefficients in float64 rounded to float32, no fma contraction) and asserted with torch.equal. DDIM
(eta = 1, full sequence) vs ops.ddpm_step with Schedule.sampling_table("fixedsmall"): sigma to
atol 1e-5 / rtol 1e-4, x_prev on the same noise to rtol = atol = 1e-5 (measured ~7e-6: the DDIM
coefficients come from the float32 alphas_bar, DDPM's table from float64). CUDA vs reference: fp32
rtol = atol = 1e-6, bf16 / fp16 one unit of the output dtype (atol 1e-3)."""
import pytest
import torch
import torch.nn.functional as F

from assert_helpers import assert_compiles_whole, assert_cuda_graph_replays_match
from cbdm_fast import ops
from cbdm_fast.ops import _extension, ddim_step, ddim_step_reference, ddpm_step
from cbdm_fast.ops.ddim_step import _coefficients
from cbdm_fast.schedule import Schedule

T = 1000
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
TRAJ_TOL = dict(rtol=1e-5, atol=1e-5)
# (t, t_prev) pairs: the final step (-1), big jumps of a sub-sequence, single steps, the ends
T_PAIRS = ([0, 1, 2, 10, 500, 999, 999, 300], [-1, 0, -1, 5, 480, -1, 998, 299])


@pytest.fixture(scope="module")
def sched():
    return Schedule(T)


@pytest.fixture(scope="module")
def ab(sched):
    return sched.alphas_bar.float()


def make_inputs(shape, device="cpu", dtype=torch.float32, guided=True, pairs=T_PAIRS):
    x_t, eps_c, eps_u, noise = (torch.randn(shape, device=device).to(dtype) for _ in range(4))
    t = torch.tensor(pairs[0], dtype=torch.int64, device=device)
    t_prev = torch.tensor(pairs[1], dtype=torch.int64, device=device)
    return x_t, eps_c, eps_u if guided else None, t, t_prev, noise


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no_eps_u"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_cpu_extension_matches_reference_bitwise(ext, ab, eta, guided, clip):
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 3, 7, 5), guided=guided)
    ref = ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=eta, omega=1.6, clip_x0=clip)
    out = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=eta, omega=1.6, clip_x0=clip, backend="extension")
    assert out.shape == x_t.shape and out.dtype == torch.float32
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_cpu_extension_parallel_path(ext, ab):
    pairs = ([999, 400], [900, -1])
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((2, 3, 700, 1000), pairs=pairs)  # 4.2M elements
    ref = ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=0.7, omega=2.0)
    out = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=0.7, omega=2.0, backend="extension")
    assert torch.equal(out, ref)


def test_reference_formula_by_hand(ab):
    """The documented formula in float64 for one sample, t = 500 -> 480, eta = 0.5, guided, clipped."""
    x_t, eps_c, eps_u, _, _, noise = make_inputs((1, 50))
    t, t_prev = torch.tensor([500]), torch.tensor([480])
    out = ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=0.5, omega=1.5, clip_x0=True)
    a_t, a_s = ab[500].double(), ab[480].double()
    eps = eps_c.double() + 1.5 * (eps_c.double() - eps_u.double())
    x0 = ((x_t.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    sigma = 0.5 * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
    want = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).sqrt() * eps + sigma * noise.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_eta0_is_deterministic_and_ignores_noise(request, ab, backend):
    if backend == "extension":
        request.getfixturevalue("ext")
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 20))
    a = ddim_step(x_t, eps_c, eps_u, t, t_prev, None, ab, eta=0.0, omega=1.0, backend=backend)
    b = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=0.0, omega=1.0, backend=backend)
    c = ddim_step(x_t, eps_c, eps_u, t, t_prev, torch.full_like(noise, float("nan")), ab, omega=1.0, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_final_step_has_no_noise_and_returns_x0(request, ab, backend):
    """t_prev = -1: ab_s = 1, so sigma = 0 for any eta and x_prev = x0 (noise not read)."""
    if backend == "extension":
        request.getfixturevalue("ext")
    x_t, eps_c, _, _, _, noise = make_inputs((3, 30))
    t, t_prev = torch.tensor([0, 7, 999]), torch.tensor([-1, -1, -1])
    out = ddim_step(x_t, eps_c, None, t, t_prev, torch.full_like(noise, float("nan")), ab, eta=1.0, backend=backend)
    a_t = ab[t].view(3, 1)
    torch.testing.assert_close(out, (x_t - (1 - a_t).sqrt() * eps_c) / a_t.sqrt(), **FP32_TOL)


def test_noise_is_added_when_eta_positive(ab):
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 20))
    a = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab, eta=0.5)
    b = ddim_step(x_t, eps_c, eps_u, t, t_prev, -noise, ab, eta=0.5)
    final = t_prev == -1
    assert torch.equal(a[final], b[final]) and (a[~final] != b[~final]).all()


def test_eta1_full_sequence_equals_ddpm_fixedsmall(sched, ab):
    """eta = 1, t_prev = t - 1 for every t in [1, T): DDIM's sigma equals DDPM's fixedsmall sigma
    (sampling_table row 4) and the whole x_prev (posterior mean + sigma * noise, same noise, no clip)
    equals ops.ddpm_step's. t = 0 is excluded (fixedsmall's sigma there is posterior_var[1]'s, not 0;
    both steps add no noise at t = 0 anyway)."""
    table = sched.sampling_table("fixedsmall")
    t = torch.arange(1, T)
    t_prev = t - 1
    sigma = _coefficients(t, t_prev, ab, 1.0)[4]
    torch.testing.assert_close(sigma, table[4, 1:], rtol=1e-4, atol=1e-5)
    x_t, eps, _, _, _, noise = make_inputs((T - 1, 3, 4, 4), pairs=([0], [0]))
    for nz in (noise, torch.zeros_like(noise)):  # the full step, and the mean alone
        ddim = ddim_step(x_t, eps, None, t, t_prev, nz, ab, eta=1.0)
        ddpm = ddpm_step(x_t, eps, None, t, nz, table)
        torch.testing.assert_close(ddim, ddpm, **TRAJ_TOL)


def test_eta1_trajectory_follows_ddpm(sched, ab):
    """A whole T-step chain with a toy denoiser (pulls towards a fixed x0): at every step t >= 1 the
    DDIM step from DDPM's current x_t matches DDPM's step (same noise), and the two free-running
    chains end at the same x_0."""
    table = sched.sampling_table("fixedsmall")
    shape = (2, 3, 8, 8)
    target = torch.rand(shape) * 2 - 1

    def model(x, tt):
        return (x - ab[tt].sqrt() * target) / (1 - ab[tt]).sqrt() + 0.05 * torch.sin(3 * x)

    x = torch.randn(shape)
    x_ddim = x.clone()
    for tt in range(T - 1, -1, -1):
        t = torch.full((2,), tt)
        noise = torch.randn(shape)
        eps = model(x, tt)
        ddpm = ddpm_step(x, eps, None, t, noise, table)
        if tt > 0:
            torch.testing.assert_close(ddim_step(x, eps, None, t, t - 1, noise, ab, eta=1.0), ddpm, **TRAJ_TOL)
        x_ddim = ddim_step(x_ddim, model(x_ddim, tt), None, t, t - 1, noise, ab, eta=1.0)
        x = ddpm
    torch.testing.assert_close(x_ddim, x, **TRAJ_TOL)


def test_schedule_float32_table_matches_double(sched, ab):
    assert ab.dtype == torch.float32 and torch.equal(ab, sched.alphas_bar.float())


# ---------------------------------------------------------------- torch.compile (the custom op)

def _guided_step(ab, eta, device="cpu"):
    """A guided sampling step: two passes of a tiny conditional "network", then ddim_step; and its inputs."""
    weight, emb = torch.randn(3, 3, 3, 3, device=device) * 0.1, torch.randn(10, 3, 1, 1, device=device)

    def step(x, t, t_prev, y, noise):
        eps_u = F.conv2d(x, weight, padding=1)
        return ddim_step(x, eps_u + emb[y], eps_u, t, t_prev, noise, ab, eta=eta, omega=1.6)

    x, _, _, t, t_prev, noise = make_inputs((8, 3, 8, 8), device=device)
    return step, (x, t, t_prev, torch.arange(8, device=device), noise if eta > 0 else None)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_compile_fullgraph_guided_step(ext, ab, eta):
    """torch.compile(fullgraph=True) over a guided step: one graph, no break, the extension reached
    through the custom op cbdm_fast::ddim_step, the result bit-identical to eager."""
    step, args = _guided_step(ab, eta)
    with torch.no_grad():
        assert_compiles_whole(step, args, "cbdm_fast.ddim_step")


@pytest.mark.parametrize("eta,guided", [(0.5, True), (0.0, False)])
def test_opcheck_custom_op(ext, ab, eta, guided):
    """Schema, fake implementation and AOT dispatch of torch.ops.cbdm_fast.ddim_step."""
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 2, 5), guided=guided)
    torch.library.opcheck(torch.ops.cbdm_fast.ddim_step.default,
                          (x_t, eps_c, eps_u, t, t_prev, noise if eta > 0 else None, ab, eta, 1.6, False))


# ---------------------------------------------------------------- errors

def _args(ab):
    x_t, eps_c, eps_u, _, _, noise = make_inputs((3, 2, 5))
    return dict(x_t=x_t, eps_c=eps_c, eps_u=eps_u, t=torch.tensor([0, 10, 999]), t_prev=torch.tensor([-1, 5, 900]),
                noise=noise, alphas_bar=ab, eta=0.5)


BAD = {  # name -> (change to the arguments, exception, message fragment)
    "eps_c_shape": (lambda a: a.update(eps_c=a["eps_c"][:, :1]), ValueError, "eps_c has shape"),
    "eps_u_shape": (lambda a: a.update(eps_u=a["eps_u"][:2]), ValueError, "eps_u has shape"),
    "noise_shape": (lambda a: a.update(noise=a["noise"].reshape(3, 10)), ValueError, "noise has shape"),
    "noise_none_eta": (lambda a: a.update(noise=None), ValueError, "noise is required when eta > 0"),
    "noise_dtype": (lambda a: a.update(noise=a["noise"].double()), TypeError, "noise has dtype"),
    "t_len": (lambda a: a.update(t=a["t"][:2]), ValueError, "t must be 1-D"),
    "t_prev_len": (lambda a: a.update(t_prev=a["t_prev"][:2]), ValueError, "t_prev must be 1-D"),
    "t_negative": (lambda a: a.update(t=torch.tensor([0, -1, 5])), ValueError, "got a timestep -1"),
    "t_equals_T": (lambda a: a.update(t=torch.tensor([0, T, 999])), ValueError, f"got a timestep {T}"),
    "t_prev_below": (lambda a: a.update(t_prev=torch.tensor([-2, 5, 900])), ValueError, "t_prev must be >= -1"),
    "t_prev_equal": (lambda a: a.update(t_prev=torch.tensor([-1, 10, 900])), ValueError,
                     r"t_prev\[1\] = 10 >= t\[1\] = 10"),
    "t_prev_above": (lambda a: a.update(t_prev=torch.tensor([-1, 5, T])), ValueError, "t_prev must be < t"),
    "t_float": (lambda a: a.update(t=a["t"].float()), TypeError, "t must be an int64"),
    "t_prev_int32": (lambda a: a.update(t_prev=a["t_prev"].int()), TypeError, "t_prev must be an int64"),
    "ab_float64": (lambda a: a.update(alphas_bar=a["alphas_bar"].double()), TypeError, "alphas_bar must be float32"),
    "ab_2d": (lambda a: a.update(alphas_bar=a["alphas_bar"].view(10, 100)), ValueError, "alphas_bar must have shape"),
    "ab_noncontig": (lambda a: a.update(alphas_bar=torch.stack([a["alphas_bar"]] * 2, 1)[:, 0]), ValueError,
                     "alphas_bar must be contiguous"),
    "ab_device": (lambda a: a.update(alphas_bar=a["alphas_bar"].to("meta")), ValueError, "alphas_bar is on meta"),
    "t_prev_device": (lambda a: a.update(t_prev=a["t_prev"].to("meta")), ValueError, "t_prev is on meta"),
    "x_t_int": (lambda a: a.update(x_t=a["x_t"].long()), TypeError, "x_t must have a floating dtype"),
    "x_t_list": (lambda a: a.update(x_t=a["x_t"].tolist()), TypeError, "x_t must be a torch.Tensor"),
    "eta_negative": (lambda a: a.update(eta=-0.1), ValueError, "eta must be finite and >= 0"),
    "eta_nan": (lambda a: a.update(eta=float("nan")), ValueError, "eta must be finite and >= 0"),
    "eta_str": (lambda a: a.update(eta="0"), TypeError, "eta must be a real number"),
    "omega_str": (lambda a: a.update(omega="1.6"), TypeError, "omega must be a real number"),
    "omega_nan": (lambda a: a.update(omega=float("nan")), ValueError, "omega must be finite.*got nan"),
    "omega_inf": (lambda a: a.update(omega=float("inf")), ValueError, "omega must be finite.*got inf"),
    "eta_inf": (lambda a: a.update(eta=float("inf")), ValueError, "eta must be finite and >= 0.*got inf"),
    "eta_above_1": (lambda a: a.update(eta=1.5), ValueError, "eta must be <= 1"),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "extension", "reference_fn"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(ab, case, backend):
    change, exc, msg = BAD[case]
    a = _args(ab)
    change(a)
    fn = ddim_step_reference if backend == "reference_fn" else ddim_step
    kw = {} if backend == "reference_fn" else {"backend": backend}
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)") if "\\" not in msg else msg):
        fn(**a, **kw)


@pytest.mark.parametrize("name", ["x_t", "eps_c", "eps_u", "noise"])
def test_non_contiguous_rejected_on_extension_path_only(ext, ab, name):
    a = _args(ab)
    a[name] = a[name].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=f"{name} is not contiguous"):
        ddim_step(**a, backend="extension")
    torch.testing.assert_close(ddim_step(**a), ddim_step(**a, backend="reference"), rtol=0, atol=0)


def test_extension_cpu_rejects_float64_and_auto_falls_back(ext, ab):
    a = _args(ab)
    for k in ("x_t", "eps_c", "eps_u", "noise"):
        a[k] = a[k].double()
    with pytest.raises(TypeError, match="needs float32"):
        ddim_step(**a, backend="extension")
    assert ddim_step(**a).dtype == torch.float64


def test_empty_batch(ab):
    x = torch.empty(0, 3)
    e = torch.empty(0, dtype=torch.int64)
    assert ddim_step(x, x, None, e, e, None, ab).shape == (0, 3)


def _raw(a, null=None, B=None, N=None, T_=None, eta=0.5, dtype=0):
    out = torch.full_like(a["x_t"], 7.0)
    p = dict(out=out.data_ptr(), x_t=a["x_t"].data_ptr(), eps_c=a["eps_c"].data_ptr(), eps_u=a["eps_u"].data_ptr(),
             t=a["t"].data_ptr(), t_prev=a["t_prev"].data_ptr(), noise=a["noise"].data_ptr(),
             alphas_bar=a["alphas_bar"].data_ptr())
    if null:
        p[null] = 0
    B = a["x_t"].shape[0] if B is None else B
    N = a["x_t"][0].numel() if N is None else N
    T_ = a["alphas_bar"].shape[0] if T_ is None else T_
    return out, (*p.values(), B, N, T_, eta, 1.6, False, dtype)


@pytest.mark.parametrize("kw,msg", [
    (dict(B=0), "B .batch size. must be > 0"),
    (dict(N=0), "N .elements per sample. must be > 0"),
    (dict(T_=0), "T .number of timesteps. must be > 0"),
    (dict(dtype=1), "only float32"),
    (dict(eta=-1.0), "eta must be finite and >= 0"),
    (dict(eta=1.5), "eta must be <= 1"),
    (dict(null="x_t"), "x_t is a null pointer"),
    (dict(null="t_prev"), "t_prev is a null pointer"),
    (dict(null="noise"), "noise is a null pointer but eta > 0"),
    (dict(null="alphas_bar"), "alphas_bar is a null pointer"),
    (dict(T_=500), r"t\[2\] = 999 is outside \[0, T\) with T = 500"),
])
def test_cpp_validation(ext, ab, kw, msg):
    a = _args(ab)  # keeps the tensors behind the raw pointers alive
    out, args = _raw(a, **kw)
    with pytest.raises(ValueError, match=msg):
        ext.ddim_step_cpu(*args)
    assert (out == 7.0).all()  # nothing written


def test_cpp_validation_t_prev(ext, ab):
    a = _args(ab)
    a["t_prev"] = torch.tensor([-1, 10, 900])
    out, args = _raw(a)
    with pytest.raises(ValueError, match=r"t_prev\[1\] = 10 is outside \[-1, t\) with t = 10"):
        ext.ddim_step_cpu(*args)
    assert (out == 7.0).all()


def test_cpp_null_noise_allowed_when_eta0(ext, ab):
    a = _args(ab)
    out, args = _raw(a, null="noise", eta=0.0)
    ext.ddim_step_cpu(*args)
    ref = ddim_step_reference(**{**a, "noise": None, "eta": 0.0}, omega=1.6)
    assert torch.equal(out, ref)


def test_cpp_cuda_entry_raises_without_gpu(ext, ab):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    a = _args(ab)
    out, args = _raw(a)
    with pytest.raises(RuntimeError, match="ddim_step_cuda"):
        ext.ddim_step_cuda(*args, 0, 0)  # dtype fp32, device 0, default stream


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eta,guided,clip", [(0.0, True, False), (0.5, False, True), (1.0, True, True)])
def test_cuda_extension_matches_reference(ext, ab, dtype, eta, guided, clip):
    if not _extension.cuda_available():
        pytest.fail(f"GPU present but the extension cannot use it: {_extension.cuda_error()}")
    abc = ab.cuda()
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 3, 16, 16), device="cuda", dtype=dtype, guided=guided)
    ref = ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=eta, omega=1.6, clip_x0=clip)
    out = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=eta, omega=1.6, clip_x0=clip, backend="extension")
    assert out.dtype == dtype
    # x0 = (...) / sqrt(ab_t) is ~100 at t = 999: compare relative to the scale of the output
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                                         atol=1e-3)
    torch.testing.assert_close(out, ref, **tol)
    cpu = ddim_step_reference(x_t.cpu().float(), eps_c.cpu().float(), None if eps_u is None else eps_u.cpu().float(),
                              t.cpu(), t_prev.cpu(), noise.cpu().float(), ab, eta=eta, omega=1.6, clip_x0=clip)
    torch.testing.assert_close(out.float().cpu(), cpu, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32
                                                          else tol))


@pytest.mark.gpu
def test_cuda_bad_t_gives_nan_not_a_crash(ext, ab):
    pairs = ([5, T + 3, -2, 10, 10], [-1, 5, -1, 10, -5])
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((5, 40), device="cuda", pairs=pairs)
    out = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab.cuda(), eta=1.0, backend="extension")
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


@pytest.mark.gpu
def test_cuda_checks_env_catches_bad_t_prev(ab, monkeypatch):
    monkeypatch.setenv("CBDM_FAST_CHECKS", "1")
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((2, 4), device="cuda", pairs=([5, 7], [-1, 7]))
    with pytest.raises(ValueError, match="t_prev must be < t"):
        ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, ab.cuda())


@pytest.mark.gpu
def test_cuda_compiled_step_in_a_cuda_graph(ext, ab):
    """mode="reduce-overhead": inductor captures the whole step, the custom op's launch on the
    capture stream included, in a CUDA graph; every call (replays after the first ones) matches eager."""
    assert_cuda_graph_replays_match(*_guided_step(ab.cuda(), 0.5, device="cuda"), **FP32_TOL)


@pytest.mark.gpu
def test_cuda_side_stream_and_graph_capture(ext, ab):
    abc = ab.cuda()
    x_t, eps_c, eps_u, t, t_prev, noise = make_inputs((8, 3, 8, 8), device="cuda")
    ref = ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=0.5, omega=2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=0.5, omega=2.0, backend="extension")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, ref, **FP32_TOL)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ddim_step(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=0.5, omega=2.0, backend="extension")
    x_t.copy_(torch.randn_like(x_t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, ddim_step_reference(x_t, eps_c, eps_u, t, t_prev, noise, abc, eta=0.5,
                                                             omega=2.0), **FP32_TOL)
