"""Compiles the Triton kernels of cbdm_fast.kernels for a GPU this machine does not have, with Triton's own
compiler and ptxas: the launches the kernel launchers make for representative shapes are recorded (not
run), then compiled ahead of time for the target. Used by test_kernels_compile.py, in a process without
TRITON_INTERPRET (so the kernels are the GPU ones and the launchers take their GPU branches).

    python tests/ops/aot_compile.py 90      # sm_90 (H100/H200); prints one JSON line per distinct launch
"""
from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

from cbdm_fast.kernels import cb_loss, group_norm_silu, group_norm_silu_rows, q_sample

LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def record_launches(modules) -> list:
    """Replaces the run() of every kernel in ``modules`` by a recorder: (kernel, args, kwargs) per launch."""
    launches = []
    for module in modules:
        for kernel in vars(module).values():
            if isinstance(kernel, JITFunction) and kernel.fn.__name__.endswith("_kernel"):
                kernel.run = (lambda k: lambda *args, grid, warmup, **kw: launches.append((k, args, kw)))(kernel)
    return launches


def make_launches(launches: list) -> None:
    """Calls every launcher at small UNet-like shapes in the layouts and dtypes the product uses."""
    T = 1000
    tables = torch.rand(T, dtype=torch.float64), torch.rand(T, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 3, 8, 8, dtype=dtype)
        t = torch.randint(0, T, (4,))
        q_sample.q_sample_fwd(x, t, x, *tables, torch.empty_like(x))
        q_sample.q_sample_bwd(x, t, *tables, torch.empty_like(x), torch.empty_like(x))
        g = torch.ones((), dtype=torch.float32)
        for bal in (True, False):
            losses = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.float32)
            cb_loss.cb_loss_fwd(x, x if bal else None, x, t, torch.ones(4), T, 1.0, *losses, torch.empty_like(x),
                                torch.empty_like(x) if bal else None)
            cb_loss.cb_loss_bwd(x, x if bal else None, g, g, torch.empty_like(x), torch.empty_like(x))
        for channels_last in (False, True):
            for shape, max_tile in (((4, 128, 16, 16), None), ((2, 64, 8, 8), 64)):  # one tile; loops
                xg = torch.randn(shape, dtype=dtype)
                if channels_last:
                    xg = xg.contiguous(memory_format=torch.channels_last)
                C = shape[1]
                w, b = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
                add = torch.zeros(shape[0], C, dtype=dtype)
                for a, act in ((add, True), (None, False)):
                    y, mean, rstd = group_norm_silu.group_norm_silu_fwd(xg, w, b, a, 32, 1e-5, act, channels_last,
                                                                        max_tile=max_tile)
                    group_norm_silu.group_norm_silu_bwd(torch.empty_like(xg), xg, w, b, a, mean, rstd, 32, act,
                                                        channels_last, max_tile=max_tile)
                if channels_last and max_tile is None:
                    _group_norm_both_strategies(xg, w, b, add)
    # the UNet's largest GroupNorm at the training batch (bf16, channels_last): several groups per program
    x = torch.empty(96, 128, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    _group_norm_both_strategies(x, torch.ones(128, dtype=x.dtype), torch.zeros(128, dtype=x.dtype),
                                torch.zeros(96, 128, dtype=x.dtype))


def _group_norm_both_strategies(x, w, b, add):
    """Channels-last forward and backward, with the time-embedding add and SiLU and without, through
    the "groups" and the "rows" kernels."""
    for strategy in group_norm_silu.STRATEGIES:
        group_norm_silu.STRATEGY = strategy
        for a, act in ((add, True), (None, False)):
            y, mean, rstd = group_norm_silu.group_norm_silu_fwd(x, w, b, a, 32, 1e-5, act, True)
            group_norm_silu.group_norm_silu_bwd(torch.empty_like(x), x, w, b, a, mean, rstd, 32, act, True)
    group_norm_silu.STRATEGY = "groups"


def signature(kernel: JITFunction, args: tuple, kwargs: dict):
    """Triton's (signature, constexprs) of one launch: each runtime argument's type as the JIT would mangle
    it (without value specialisation), each constexpr's value."""
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    sig, constexprs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if i in kernel.constexprs:
            sig[name], constexprs[name] = "constexpr", values[name]
        else:
            sig[name] = mangle_type(values[name])
    return sig, constexprs


def main(arch: int) -> None:
    launches = record_launches([q_sample, cb_loss, group_norm_silu, group_norm_silu_rows])
    make_launches(launches)
    seen = set()
    for kernel, args, kwargs in launches:
        sig, constexprs = signature(kernel, args, kwargs)
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(constexprs.items()), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        print(json.dumps({"kernel": kernel.fn.__name__, "signature": sig, "constexprs": constexprs,
                          "options": options, "cubin_bytes": len(compiled.asm["cubin"]),
                          "shared_bytes": compiled.metadata.shared,
                          "f32_fma": ptx.count("fma.rn.f32"), "ptx_target": f"sm_{arch}" in ptx}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
