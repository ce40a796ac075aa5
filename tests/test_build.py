"""The build: what cbdm_fast._C was compiled with, that it does not link torch, that nvcc compiles the
CUDA sources for sm_80 and sm_90, the CMake switches, and the installed package layout."""
import importlib.metadata
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


@pytest.fixture(scope="module")
def C():
    try:
        import cbdm_fast._C as mod
    except ImportError as e:
        pytest.fail(f"cbdm_fast._C is not built or does not import ({e}); run `pip install -e .`")
    return mod


def test_extension_reports_what_was_compiled(C):
    assert isinstance(C.has_cuda(), bool)
    archs = C.cuda_archs()
    assert isinstance(archs, str)
    if C.has_cuda():
        assert archs and all(re.fullmatch(r"\d+[af]?(-real|-virtual)?", a) for a in archs.split(";")), archs
    else:
        assert archs == ""
        assert "without CUDA" in C.cuda_runtime_error()


def test_cuda_was_compiled_when_expected(C):
    """CI sets CBDM_FAST_EXPECT_CUDA=1: proof that nvcc compiled the CUDA part into the module."""
    if os.environ.get("CBDM_FAST_EXPECT_CUDA") != "1":
        pytest.skip("CBDM_FAST_EXPECT_CUDA=1 not set")
    assert C.has_cuda(), "cbdm_fast._C was built without its CUDA part (was nvcc on PATH? CBDM_FAST_CUDA=0?)"
    assert C.cuda_archs()


def _needed_libraries(path: str):
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    pytest.skip("neither readelf nor ldd is available to read the module's dependencies")


def test_extension_does_not_link_torch(C):
    needed = _needed_libraries(C.__file__)
    assert needed, "no DT_NEEDED entries found"
    torch_libs = [n for n in needed if re.search(r"torch|c10", n)]
    assert not torch_libs, f"cbdm_fast._C must not link torch, but needs {torch_libs}"
    # the CUDA runtime is linked statically: no libcudart.so.N needed whatever CUDA torch ships
    assert not [n for n in needed if "cudart" in n], needed


def _nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _cubin_sm(path: Path) -> int:
    """The SM version recorded in a cubin's ELF header (e_flags; layout changed with ABI version 8)."""
    head = path.read_bytes()[:64]
    assert head[:4] == b"\x7fELF", "not an ELF file"
    abi_version = head[8]
    (machine,) = struct.unpack_from("<H", head, 18)
    assert machine == 190, f"ELF machine {machine} is not EM_CUDA (190)"
    (flags,) = struct.unpack_from("<I", head, 48)
    return (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF


@pytest.mark.parametrize("sm", [80, 90])
def test_nvcc_compiles_the_cuda_sources(sm, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDACXX, /usr/local/cuda/bin)")
    assert CU_SOURCES, "no csrc/*.cu"
    for src in CU_SOURCES:
        out = tmp_path / f"{src.stem}.sm_{sm}.cubin"
        cmd = [nvcc, "-std=c++17", "-O3", "--fmad=false", f"-I{ROOT / 'csrc'}", "-cubin",
               f"-gencode=arch=compute_{sm},code=sm_{sm}", str(src), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"nvcc failed on {src.name} for sm_{sm}:\n{res.stderr}"
        assert _cubin_sm(out) == sm


def _configure(tmp_path, cuda, env):
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is needed to configure the CMake project")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    build = tmp_path / "build"
    cmd = [cmake, "-S", str(ROOT), "-B", str(build), f"-DCBDM_FAST_CUDA={cuda}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        cmd[1:1] = ["-G", "Ninja"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env), build


def _env_without_nvcc():
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT")}
    dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()]
    env["PATH"] = os.pathsep.join(dirs)
    return env


def test_cmake_cuda_on_without_nvcc_is_a_clear_error(tmp_path):
    res, _ = _configure(tmp_path, "ON", _env_without_nvcc())
    if res.returncode == 0:
        pytest.skip("CMake still found a CUDA compiler outside PATH")
    assert "CBDM_FAST_CUDA=ON but no CUDA compiler was found" in res.stdout + res.stderr


def test_cmake_cuda_off_builds_without_cuda(tmp_path):
    """The CPU-only build (csrc/no_cuda.cpp instead of the .cu files) compiles and links; its CUDA entry
    points raise a RuntimeError that says why, and the CPU ones work."""
    res, build = _configure(tmp_path, "OFF", dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    header = (build / "generated" / "cbdm_build_config.h").read_text()
    assert "#define CBDM_FAST_WITH_CUDA 0" in header
    res = subprocess.run([shutil.which("cmake"), "--build", str(build)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    (module,) = build.glob("_C*.so")
    code = ("import _C\n"
            "assert not _C.has_cuda() and _C.cuda_runtime_error() == 'cbdm_fast._C was built without CUDA'\n"
            "try:\n"
            "    _C.dpm_step_cuda(1, 1, 0, 2, 3, 4, 1, 1, 1, False, 0, 0, 0)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=module.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "dpm_step_cuda: cbdm_fast._C was built without CUDA" in res.stdout


def test_installed_package_layout(tmp_path):
    """kernels/ is installed as cbdm_fast.kernels and bench/ as cbdm_fast.bench, with its ops/ setups and
    its CLI (checked from outside the repository)."""
    try:
        importlib.metadata.distribution("cbdm_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cbdm_fast is not pip-installed")
    code = ("import cbdm_fast, cbdm_fast.kernels, cbdm_fast._C, cbdm_fast.bench.ops.run; "
            "print(cbdm_fast.kernels.__doc__); print(cbdm_fast._C.__file__); print(cbdm_fast.bench.__doc__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "Triton kernels" in res.stdout and "The benchmarks, installed as cbdm_fast.bench" in res.stdout
    res = subprocess.run([sys.executable, "-m", "cbdm_fast.bench", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and "{train,ops,sample,ceiling}" in res.stdout, res.stderr
