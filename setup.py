"""Build of cbdm_fast: the Python package plus the pybind11 extension cbdm_fast._C, built by CMake + Ninja.

Environment:
  CBDM_FAST_CUDA=auto|0|1      build the CUDA part: when nvcc is found (default) / never / always (error if no nvcc)
  CBDM_FAST_CUDA_ARCHS="80;90" CUDA architectures (CMake syntax)
  CBDM_FAST_BUILD_JOBS=N       parallel compile jobs (default: ninja's choice)
  CBDM_FAST_BUILD_TYPE=Release CMake build type
The extension never links torch, so the build needs no torch (pyproject's build requirements omit it).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = Path(source_dir)


def _build_tool(name: str, bin_dir_attr: str) -> str:
    """The tool from its pip build requirement (module `name`) first, else the one on PATH."""
    try:
        module = __import__(name)
        exe = Path(getattr(module, bin_dir_attr)) / name
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"cbdm_fast: {name} is required to build the extension (pip install {name})")
    return exe


def _cmake() -> str:
    return _build_tool("cmake", "CMAKE_BIN_DIR")


def _ninja() -> str:
    return _build_tool("ninja", "BIN_DIR")


def _cuda_mode() -> str:
    mode = os.environ.get("CBDM_FAST_CUDA", "auto").strip().lower()
    table = {"auto": "AUTO", "": "AUTO", "1": "ON", "on": "ON", "true": "ON", "0": "OFF", "off": "OFF", "false": "OFF"}
    if mode not in table:
        raise RuntimeError(f"cbdm_fast: CBDM_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return table[mode]


class CMakeBuild(build_ext):
    """Configures and builds each CMakeExtension with `cmake -G Ninja`; the module is written straight to
    the path setuptools expects (build_lib; setuptools then copies it into the source tree for
    --inplace and editable installs)."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _cuda_mode()
        args = [
            _cmake(), "-S", str(ext.source_dir), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_ninja()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CBDM_FAST_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCBDM_FAST_OUTPUT_DIR={target.parent}",
            f"-DCBDM_FAST_CUDA={cuda}",
            f"-DCBDM_FAST_CUDA_ARCHS={os.environ.get('CBDM_FAST_CUDA_ARCHS', '80;90')}",
        ]
        subprocess.run(args, check=True)
        build = [_cmake(), "--build", str(build_dir)]
        jobs = os.environ.get("CBDM_FAST_BUILD_JOBS")
        if jobs:
            build += ["-j", jobs]
        subprocess.run(build, check=True)
        if not target.exists():
            raise RuntimeError(f"cbdm_fast: CMake did not produce {target}")


# Folders at the top of the repository installed as subpackages of cbdm_fast: the Triton kernels and the
# benchmarks (bench/'s pytest suites and experiments are scripts, not packages, and stay out).
SUBPACKAGE_DIRS = {"cbdm_fast.kernels": "kernels", "cbdm_fast.bench": "bench"}
subpackages = [f"{name}.{p}" if p else name for name, folder in SUBPACKAGE_DIRS.items()
               for p in [""] + find_packages(where=folder)]

setup(
    packages=find_packages(include=["cbdm_fast", "cbdm_fast.*"]) + subpackages,
    package_dir=SUBPACKAGE_DIRS,
    ext_modules=[CMakeExtension("cbdm_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
