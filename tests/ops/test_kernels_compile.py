"""Every Triton kernel compiles for the GPUs the product runs on (sm_90: H100, H200), on this machine, with
no GPU: tests/ops/aot_compile.py records the launches the kernel launchers make and compiles each with
Triton's compiler and ptxas. The interpreter tests check what the kernels compute; this checks that the
GPU build of the same source compiles, and what its code holds."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "kernels"


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU kernels, not the interpreter's
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py")), "90"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def _kernels_defined() -> set:
    """The names of the @triton.jit functions that are launched (named *_kernel) in kernels/*.py."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def test_every_kernel_compiles_to_a_cubin_for_sm90(compiled):
    assert _kernels_defined() <= {r["kernel"] for r in compiled}, "a kernel aot_compile.py does not launch"
    for r in compiled:
        assert r["cubin_bytes"] > 0 and r["ptx_target"], r


def test_both_io_dtypes_and_both_layouts_are_compiled(compiled):
    io = {r["signature"].get("x_ptr", r["signature"].get("h_ptr")) for r in compiled}
    assert {"*fp32", "*bf16"} <= io
    groups = [r["constexprs"] for r in compiled if r["kernel"] == "_gn_silu_fwd_kernel"]
    assert {(c["CL"], c["ONE_TILE"]) for c in groups} == {(False, True), (False, False), (True, True), (True, False)}
    assert max(c["GPP"] for c in groups) > 1  # the training shape's several groups per program


def test_fp_contraction_is_chosen_at_every_launch(compiled):
    """Triton's default for fma contraction changes in 3.10; every launch states it (kernels/_common.FMA)."""
    for r in compiled:
        assert "enable_fp_fusion" in r["options"], r["kernel"]


def test_q_sample_has_no_fma_so_fp32_stays_bit_identical_to_torch(compiled):
    """kernels/q_sample.py's claim: x_t = a * x + s * n is rounded after each product and the sum, like
    torch's eager CPU/GPU code, so its fp32 results are bit-identical (tests/ops/test_q_sample.py)."""
    q = [r for r in compiled if r["kernel"].startswith("_q_sample")]
    assert len(q) == 4 and all(r["f32_fma"] == 0 for r in q), q
    fused = [r for r in compiled if r["kernel"] == "_gn_silu_fwd_kernel"]
    assert all(r["f32_fma"] > 0 for r in fused)  # the count can see an fma where one is allowed
