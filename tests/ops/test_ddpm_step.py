"""ops.ddpm_step: the C++ extension (CPU here, CUDA on a GPU) against the pure-torch reference, the
reference against the golden fixture of the authors' code, and the documented errors.

Tolerances: extension vs reference in fp32 is expected to be bit-identical (same operation order,
no fma contraction in the build); it is asserted to rtol = atol = 1e-6. Against the authors' golden
x_prev: rtol = atol = 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from assert_helpers import assert_compiles_whole, assert_cuda_graph_replays_match
from cbdm_fast import ops
from cbdm_fast.ops import _extension, ddpm_step, ddpm_step_reference

T = 1000
VAR_TYPES = ("fixedlarge", "fixedsmall")
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
GOLDEN_TOL = dict(rtol=1e-5, atol=1e-5)


def make_table(T: int, var_type: str) -> torch.Tensor:
    """(5, T) float32 sampling table of the DDPM schedule (beta 1e-4 .. 0.02), everything in float64
    except the linspace, which the authors' code takes in float32 (``torch.linspace(...).double()``):
    with it the golden sample whose eps is stored matches bit for bit (a float64 linspace: 1.2e-7)."""
    betas = torch.linspace(1e-4, 0.02, T).double()
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = F.pad(ab, [1, 0], value=1)[:T]
    posterior_var = betas * (1 - ab_prev) / (1 - ab)
    rows = [torch.sqrt(1 / ab), torch.sqrt(1 / ab - 1), torch.sqrt(ab_prev) * betas / (1 - ab),
            torch.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab)]
    if var_type == "fixedlarge":
        log_var = torch.log(torch.cat([posterior_var[1:2], betas[1:]]))
    else:
        log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
    sigma = torch.exp(0.5 * log_var.float())
    return torch.stack([r.float() for r in rows] + [sigma.float()]).contiguous()


@pytest.fixture(scope="module")
def tables():
    return {vt: make_table(T, vt) for vt in VAR_TYPES}


def make_inputs(shape, t, device="cpu", dtype=torch.float32, guided=True):
    x_t = torch.randn(shape, device=device).to(dtype)
    eps_c = torch.randn(shape, device=device).to(dtype)
    eps_u = torch.randn(shape, device=device).to(dtype) if guided else None
    noise = torch.randn(shape, device=device).to(dtype)
    return x_t, eps_c, eps_u, torch.tensor(t, dtype=torch.int64, device=device), noise


CASES = [  # (shape, per-sample t): odd N = 3*5*7, B = 1 and 7, t = 0 and T-1 mixed with others
    ((7, 3, 5, 7), [0, T - 1, 1, 500, 0, 250, T - 2]),
    ((1, 3, 5, 7), [0]),
    ((1, 3, 5, 7), [T - 1]),
    ((7, 3, 16, 16), [999, 998, 600, 300, 2, 1, 0]),
    ((3, 20000), [10, 0, 700]),  # N above the CPU chunk size (16384): several chunks per sample
]


@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no_eps_u"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape,t", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_cpu_extension_matches_reference(ext, tables, var_type, guided, clip, shape, t):
    x_t, eps_c, eps_u, tt, noise = make_inputs(shape, t, guided=guided)
    table = tables[var_type]
    ref = ddpm_step_reference(x_t, eps_c, eps_u, tt, noise, table, omega=1.6, clip_x0=clip)
    out = ddpm_step(x_t, eps_c, eps_u, tt, noise, table, omega=1.6, clip_x0=clip, backend="extension")
    assert out.dtype == x_t.dtype and out.shape == x_t.shape
    torch.testing.assert_close(out, ref, **FP32_TOL)
    auto = ddpm_step(x_t, eps_c, eps_u, tt, noise, table, omega=1.6, clip_x0=clip)
    torch.testing.assert_close(auto, ref, **FP32_TOL)


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_cpu_extension_parallel_path(ext, tables, clip):
    """B * N >= 2**21 elements: the OpenMP-parallel path (when built with OpenMP), 3 chunks per sample."""
    x_t, eps_c, eps_u, t, noise = make_inputs((3, 3, 512, 512), [0, 999, 421])
    ref = ddpm_step_reference(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=1.6, clip_x0=clip)
    out = ddpm_step(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=1.6, clip_x0=clip, backend="extension")
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_reference_formula_by_hand(tables):
    """The reference is the documented formula, written out per sample in float64."""
    x_t, eps_c, eps_u, t, noise = make_inputs((4, 2, 3), [0, 1, 500, 999])
    table = tables["fixedlarge"].double()
    out = ddpm_step_reference(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=0.8, clip_x0=True)
    for b in range(4):
        a, m1, c1, c2, s = table[:, t[b]]
        eps = eps_c[b].double() + 0.8 * (eps_c[b].double() - eps_u[b].double())
        x0 = (a * x_t[b].double() - m1 * eps).clamp(-1, 1)
        want = c1 * x0 + c2 * x_t[b].double() + (s * noise[b].double() if t[b] > 0 else 0)
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)


def test_clip_changes_the_result_at_high_t(tables):
    x_t, eps_c, eps_u, t, noise = make_inputs((2, 50), [999, 900])
    a = ddpm_step(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=1.0, clip_x0=False)
    b = ddpm_step(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=1.0, clip_x0=True)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_no_noise_at_t0(request, tables, backend):
    if backend == "extension":
        request.getfixturevalue("ext")
    x_t, eps_c, eps_u, t, noise = make_inputs((3, 3, 5, 7), [0, 0, 5])
    nan_noise = noise.clone()
    nan_noise[:2] = float("nan")  # must never be read at t = 0
    zero_noise = torch.zeros_like(noise)
    out = ddpm_step(x_t, eps_c, eps_u, t, nan_noise, tables["fixedsmall"], omega=1.6, backend=backend)
    mean = ddpm_step(x_t, eps_c, eps_u, t, zero_noise, tables["fixedsmall"], omega=1.6, backend=backend)
    assert torch.isfinite(out[:2]).all()
    torch.testing.assert_close(out[:2], mean[:2], rtol=0, atol=0)
    assert not torch.equal(out[2], mean[2])  # t = 5 > 0: noise is added


def test_noise_is_added_for_t_positive(tables):
    x_t, eps_c, eps_u, t, noise = make_inputs((2, 10), [1, 999])
    out = ddpm_step(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"], omega=1.0)
    mean = ddpm_step(x_t, eps_c, eps_u, t, torch.zeros_like(noise), tables["fixedlarge"], omega=1.0)
    sigma = tables["fixedlarge"][4, t].view(2, 1)
    torch.testing.assert_close(out - mean, sigma * noise, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- torch.compile (the custom op)

def _guided_step(table, device="cpu"):
    """A guided sampling step: two passes of a tiny conditional "network", then ddpm_step; and its inputs."""
    weight, emb = torch.randn(3, 3, 3, 3, device=device) * 0.1, torch.randn(10, 3, 1, 1, device=device)

    def step(x, t, y, noise):
        eps_u = F.conv2d(x, weight, padding=1)
        return ddpm_step(x, eps_u + emb[y], eps_u, t, noise, table, omega=1.6)

    x, _, _, t, noise = make_inputs((4, 3, 8, 8), [0, 1, 500, 999], device=device)
    return step, (x, t, torch.tensor([0, 3, 5, 9], device=device), noise)


def test_compile_fullgraph_guided_step(ext, tables):
    """torch.compile(fullgraph=True) over a guided step: one graph, no break, the extension reached
    through the custom op cbdm_fast::ddpm_step, the result bit-identical to eager."""
    step, args = _guided_step(tables["fixedlarge"])
    with torch.no_grad():
        assert_compiles_whole(step, args, "cbdm_fast.ddpm_step")


@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no_eps_u"])
def test_opcheck_custom_op(ext, tables, guided):
    """Schema, fake implementation and AOT dispatch of torch.ops.cbdm_fast.ddpm_step."""
    x_t, eps_c, eps_u, t, noise = make_inputs((3, 2, 5), [0, 10, 999], guided=guided)
    torch.library.opcheck(torch.ops.cbdm_fast.ddpm_step.default,
                          (x_t, eps_c, eps_u, t, noise, tables["fixedsmall"], 1.6, False))


# ---------------------------------------------------------------- golden values (the authors' code)

@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_golden_step_for_samples_whose_eps_is_at_t500(request, fixture, tables, var_type, backend):
    """fixture['eps_cond'/'eps_uncond'] are the network at fixture['t'] (0, 1, 250, 500, 998, 999),
    while the golden step evaluated the network at t = 500: only the samples whose own t is 500
    can use the stored eps directly."""
    if backend == "extension":
        request.getfixturevalue("ext")
    step = fixture["sample_step"][var_type]
    keep = fixture["t"] == step["t"]
    assert keep.any()
    t = torch.full((int(keep.sum()),), step["t"], dtype=torch.int64)
    out = ddpm_step(fixture["x_t"][keep], fixture["eps_cond"][keep], fixture["eps_uncond"][keep], t,
                    step["noise"][keep], tables[var_type], omega=step["omega"], backend=backend)
    torch.testing.assert_close(out, step["x_prev"][keep], **GOLDEN_TOL)


@pytest.fixture(scope="module")
def eps_at_t500(fixture):
    """The network (authors' weights, cbdm_fast.model.UNet) at the golden step's t = 500."""
    model_mod = pytest.importorskip("cbdm_fast.model")
    model = model_mod.UNet(**fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    model.eval()
    x_t = fixture["x_t"]
    t = torch.full((x_t.shape[0],), fixture["sample_step"]["fixedlarge"]["t"], dtype=torch.int64)
    with torch.no_grad():
        return t, model(x_t, t, fixture["y"]), model(x_t, t, None)


@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_golden_step_all_samples_with_the_model(request, fixture, tables, eps_at_t500, var_type, backend):
    """All six samples: eps from the authors' weights at t = 500 through cbdm_fast.model.UNet."""
    if backend == "extension":
        request.getfixturevalue("ext")
    step = fixture["sample_step"][var_type]
    t, eps_c, eps_u = eps_at_t500
    assert int(t[0]) == step["t"]
    out = ddpm_step(fixture["x_t"], eps_c, eps_u, t, step["noise"], tables[var_type], omega=step["omega"],
                    backend=backend)
    torch.testing.assert_close(out, step["x_prev"], **GOLDEN_TOL)


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_schedule_sampling_table_is_this_table(tables, var_type):
    schedule = pytest.importorskip("cbdm_fast.schedule")
    table = schedule.Schedule(T).sampling_table(var_type)
    assert table.dtype == torch.float32 and table.shape == (5, T) and table.is_contiguous()
    torch.testing.assert_close(table, tables[var_type], rtol=0, atol=0)


# ---------------------------------------------------------------- errors

def _args(tables):
    x_t, eps_c, eps_u, t, noise = make_inputs((3, 2, 5), [0, 10, 999])
    return dict(x_t=x_t, eps_c=eps_c, eps_u=eps_u, t=t, noise=noise, table=tables["fixedlarge"])


BAD = {  # name -> (change to the arguments, exception, message fragment)
    "eps_c_shape": (lambda a: a.update(eps_c=a["eps_c"][:, :1]), ValueError, "eps_c has shape"),
    "eps_u_shape": (lambda a: a.update(eps_u=a["eps_u"][:2]), ValueError, "eps_u has shape"),
    "noise_shape": (lambda a: a.update(noise=a["noise"].reshape(3, 10)), ValueError, "noise has shape"),
    "t_len": (lambda a: a.update(t=a["t"][:2]), ValueError, "t must be 1-D"),
    "t_2d": (lambda a: a.update(t=a["t"].view(3, 1)), ValueError, "t must be 1-D"),
    "t_negative": (lambda a: a.update(t=torch.tensor([0, -1, 5])), ValueError, "got a timestep -1"),
    "t_equals_T": (lambda a: a.update(t=torch.tensor([0, T, 5])), ValueError, f"got a timestep {T}"),
    "t_float": (lambda a: a.update(t=a["t"].float()), TypeError, "t must be an int64"),
    "t_int32": (lambda a: a.update(t=a["t"].int()), TypeError, "t must be an int64"),
    "table_shape": (lambda a: a.update(table=a["table"][:4]), ValueError, "table must have shape (5, T)"),
    "table_1d": (lambda a: a.update(table=a["table"][0]), ValueError, "table must have shape (5, T)"),
    "table_float64": (lambda a: a.update(table=a["table"].double()), TypeError, "table must be float32"),
    "table_noncontig": (lambda a: a.update(table=a["table"].t().contiguous().t()), ValueError,
                        "table must be contiguous"),
    "table_device": (lambda a: a.update(table=a["table"].to("meta")), ValueError, "table is on meta"),
    "noise_device": (lambda a: a.update(noise=a["noise"].to("meta")), ValueError, "noise is on meta"),
    "t_device": (lambda a: a.update(t=a["t"].to("meta")), ValueError, "t is on meta"),
    "eps_u_dtype": (lambda a: a.update(eps_u=a["eps_u"].double()), TypeError, "eps_u has dtype"),
    "x_t_int": (lambda a: a.update(x_t=a["x_t"].long()), TypeError, "x_t must have a floating dtype"),
    "x_t_list": (lambda a: a.update(x_t=a["x_t"].tolist()), TypeError, "x_t must be a torch.Tensor"),
    "omega_str": (lambda a: a.update(omega="1.6"), TypeError, "omega must be a real number"),
    "omega_nan": (lambda a: a.update(omega=float("nan")), ValueError, "omega must be finite.*got nan"),
    "omega_inf": (lambda a: a.update(omega=float("inf")), ValueError, "omega must be finite.*got inf"),
    "omega_minus_inf": (lambda a: a.update(omega=-float("inf")), ValueError, "omega must be finite.*got -inf"),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "extension", "reference_fn"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(tables, case, backend):
    change, exc, msg = BAD[case]
    a = _args(tables)
    change(a)
    fn = ddpm_step_reference if backend == "reference_fn" else ddpm_step
    kw = {} if backend == "reference_fn" else {"backend": backend}
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fn(**a, **kw)


@pytest.mark.parametrize("name", ["x_t", "eps_c", "eps_u", "noise"])
def test_non_contiguous_rejected_on_extension_path_only(ext, tables, name):
    a = _args(tables)
    a[name] = a[name].transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not a[name].is_contiguous()
    with pytest.raises(ValueError, match=f"{name} is not contiguous"):
        ddpm_step(**a, backend="extension")
    ref = ddpm_step(**a, backend="reference")
    torch.testing.assert_close(ddpm_step(**a), ref, **FP32_TOL)  # auto falls back
    contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    torch.testing.assert_close(ddpm_step(**contiguous, backend="extension"), ref, **FP32_TOL)


def test_extension_cpu_rejects_float64_and_auto_falls_back(ext, tables):
    a = {k: (v.double() if k in ("x_t", "eps_c", "eps_u", "noise") else v) for k, v in _args(tables).items()}
    with pytest.raises(TypeError, match="float32"):
        ddpm_step(**a, backend="extension")
    out = ddpm_step(**a)
    assert out.dtype == torch.float64


def test_autograd_goes_to_the_reference(ext, tables):
    a = _args(tables)
    a["eps_c"].requires_grad_(True)
    with pytest.raises(ValueError, match="autograd"):
        ddpm_step(**a, backend="extension")
    ddpm_step(**a).sum().backward()
    assert a["eps_c"].grad is not None
    with torch.no_grad():
        torch.testing.assert_close(ddpm_step(**a, backend="extension"), ddpm_step(**a, backend="reference"))


def test_empty_batch(tables):
    a = _args(tables)
    a = {k: (v[:0] if k != "table" else v) for k, v in a.items()}
    assert ddpm_step(**a).shape == (0, 2, 5)


def test_import_failure_warns_once(monkeypatch):
    monkeypatch.delenv("CBDM_FAST_NO_EXT", raising=False)
    monkeypatch.setattr(_extension, "_module", _extension._UNSET)
    monkeypatch.setattr(_extension, "_import_error", None)

    def broken(name):
        raise ImportError("simulated: undefined symbol foo")

    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    with pytest.warns(RuntimeWarning, match="simulated: undefined symbol foo") as record:
        assert _extension.load() is None
        assert _extension.load() is None
        assert not _extension.available()
    assert len([w for w in record if "cbdm_fast._C" in str(w.message)]) == 1
    assert "simulated" in _extension.unavailable_reason()


# ---------------------------------------------------------------- the C++ layer directly

def _raw(a, B=None, N=None, T_=None, dtype=0, null=None):
    out = torch.full_like(a["x_t"], 7.0)
    p = dict(out=out.data_ptr(), x_t=a["x_t"].data_ptr(), eps_c=a["eps_c"].data_ptr(), eps_u=a["eps_u"].data_ptr(),
             t=a["t"].data_ptr(), noise=a["noise"].data_ptr(), table=a["table"].data_ptr())
    if null:
        p[null] = 0
    B = a["x_t"].shape[0] if B is None else B
    N = a["x_t"][0].numel() if N is None else N
    T_ = a["table"].shape[1] if T_ is None else T_
    return out, (*p.values(), B, N, T_, 1.6, False, dtype)


@pytest.mark.parametrize("kw,msg", [
    (dict(B=0), "B .batch size. must be > 0"),
    (dict(N=0), "N .elements per sample. must be > 0"),
    (dict(T_=0), "T .number of timesteps. must be > 0"),
    (dict(dtype=1), "only float32"),
    (dict(null="x_t"), "x_t is a null pointer"),
    (dict(null="noise"), "noise is a null pointer"),
    (dict(null="table"), "table is a null pointer"),
    (dict(T_=500), r"t\[2\] = 999 is outside \[0, T\) with T = 500"),
])
def test_cpp_validation(ext, tables, kw, msg):
    a = _args(tables)
    out, args = _raw(a, **kw)
    with pytest.raises(ValueError, match=msg):
        ext.ddpm_step_cpu(*args)
    assert (out == 7.0).all()  # nothing written


def test_cpp_cuda_entry_raises_without_gpu(ext, tables):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    a = _args(tables)
    out, args = _raw(a)
    with pytest.raises(RuntimeError, match="ddpm_step_cuda"):
        ext.ddpm_step_cuda(*args[:-1], 0, 0, 0)  # dtype fp32, device 0, default stream


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guided,clip", [(True, False), (False, True)])
def test_cuda_extension_matches_reference(ext, tables, dtype, guided, clip):
    if not _extension.cuda_available():
        pytest.fail(f"GPU present but the extension cannot use it: {_extension.cuda_error()}")
    table = tables["fixedlarge"].cuda()
    for shape, t in CASES:
        x_t, eps_c, eps_u, tt, noise = make_inputs(shape, t, device="cuda", dtype=dtype, guided=guided)
        ref = ddpm_step_reference(x_t, eps_c, eps_u, tt, noise, table, omega=1.6, clip_x0=clip)
        out = ddpm_step(x_t, eps_c, eps_u, tt, noise, table, omega=1.6, clip_x0=clip, backend="extension")
        assert out.dtype == dtype
        tol = FP32_TOL if dtype == torch.float32 else dict(rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                                             atol=1e-3)
        torch.testing.assert_close(out, ref, **tol)
        cpu = ddpm_step_reference(x_t.cpu().float(), eps_c.cpu().float(), None if eps_u is None else eps_u.cpu().float(),
                                  tt.cpu(), noise.cpu().float(), tables["fixedlarge"], omega=1.6, clip_x0=clip)
        torch.testing.assert_close(out.float().cpu(), cpu, **(FP32_TOL if dtype == torch.float32 else tol))


@pytest.mark.gpu
def test_cuda_bad_t_gives_nan_not_a_crash(ext, tables):
    table = tables["fixedlarge"].cuda()
    x_t, eps_c, eps_u, t, noise = make_inputs((3, 40), [5, T + 3, -2], device="cuda")
    out = ddpm_step(x_t, eps_c, eps_u, t, noise, table, omega=1.0, backend="extension")
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


@pytest.mark.gpu
def test_cuda_checks_env_catches_bad_t(tables, monkeypatch):
    monkeypatch.setenv("CBDM_FAST_CHECKS", "1")
    x_t, eps_c, eps_u, t, noise = make_inputs((2, 4), [5, T], device="cuda")
    with pytest.raises(ValueError, match="t must be in"):
        ddpm_step(x_t, eps_c, eps_u, t, noise, tables["fixedlarge"].cuda())


@pytest.mark.gpu
def test_cuda_compiled_step_in_a_cuda_graph(ext, tables):
    """mode="reduce-overhead": inductor captures the whole step, the custom op's launch on the
    capture stream included, in a CUDA graph; every call (replays after the first ones) matches eager."""
    assert_cuda_graph_replays_match(*_guided_step(tables["fixedlarge"].cuda(), device="cuda"), **FP32_TOL)


@pytest.mark.gpu
def test_cuda_side_stream_and_graph_capture(ext, tables):
    table = tables["fixedsmall"].cuda()
    x_t, eps_c, eps_u, t, noise = make_inputs((4, 3, 8, 8), [0, 1, 500, 999], device="cuda")
    ref = ddpm_step_reference(x_t, eps_c, eps_u, t, noise, table, omega=2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ddpm_step(x_t, eps_c, eps_u, t, noise, table, omega=2.0, backend="extension")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, ref, **FP32_TOL)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ddpm_step(x_t, eps_c, eps_u, t, noise, table, omega=2.0, backend="extension")
    x_t.copy_(torch.randn_like(x_t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, ddpm_step_reference(x_t, eps_c, eps_u, t, noise, table, omega=2.0),
                               **FP32_TOL)
