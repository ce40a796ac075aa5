"""Shared assertions that say WHERE tensors differ, and error bounds relative to torch's own error.

    assert_close(actual, expected, atol=..., rtol=..., name="dx")
        elementwise |actual - expected| <= atol + rtol * |expected| (NaNs must coincide); on failure
        the message gives the max abs and rel errors, the index and values of the worst element,
        how many elements fail and a few of them.
    lowp_bound(torch_lowp, ref64, k)
        k x torch's own error at low precision: k * max|torch_lowp - ref64|, floored at k times half an
        ulp of the reference's largest value (so an exactly rounded torch result does not give a zero bound).
    assert_within_torch_error(actual, torch_lowp, ref64, k, name="dx")
        max|actual - ref64| <= lowp_bound(torch_lowp, ref64, k); the message gives both errors and their ratio.
    assert_op_and_reference_raise(op, reference, kwargs, exc, pattern)
        the op and (unless kwargs choose a backend) its reference function raise exc matching pattern.
    assert_compiles_whole(fn, args, op)
        torch.compile(fn, fullgraph=True) over args: one graph, no graph break, the custom op in it, and
        the same result as fn (bitwise unless atol is given).
    assert_cuda_graph_replays_match(fn, args)
        torch.compile(fn, mode="reduce-overhead") replays a CUDA graph that gives fn's results.
"""
from __future__ import annotations

import torch

__all__ = ["describe_diff", "assert_close", "max_abs_error", "lowp_bound", "assert_within_torch_error",
           "assert_op_and_reference_raise", "assert_compiles_whole", "assert_cuda_graph_replays_match"]


def _index(flat_index: int, shape) -> tuple:
    idx = []
    for size in reversed(tuple(shape)):
        idx.append(flat_index % size if size else 0)
        flat_index //= max(size, 1)
    return tuple(reversed(idx))


def describe_diff(actual: torch.Tensor, expected: torch.Tensor, fail_mask: torch.Tensor | None = None,
                  n_show: int = 5) -> str:
    """A few lines: max abs / rel error, the worst element's index and values, failing elements."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    lines = [f"shape {tuple(a.shape)}, actual dtype {actual.dtype}, expected dtype {expected.dtype}"]
    if diff.numel() == 0:
        return lines[0] + " (empty)"
    worst = int(diff.reshape(-1).argmax())
    wi = _index(worst, a.shape)
    lines.append(f"max abs error {diff.max().item():.3e} at index {wi}: actual {a.reshape(-1)[worst].item():.8g}, "
                 f"expected {e.reshape(-1)[worst].item():.8g}")
    worst_rel = int(rel.reshape(-1).argmax())
    lines.append(f"max rel error {rel.max().item():.3e} at index {_index(worst_rel, a.shape)} "
                 f"(max |expected| {e.abs().max().item():.4g})")
    if fail_mask is not None:
        bad = fail_mask.reshape(-1).nonzero().reshape(-1)
        lines.append(f"{bad.numel()} of {a.numel()} elements out of tolerance" + (", e.g.:" if bad.numel() else ""))
        for i in bad[:n_show].tolist():
            lines.append(f"  {_index(i, a.shape)}: actual {a.reshape(-1)[i].item():.8g}, "
                         f"expected {e.reshape(-1)[i].item():.8g}, diff {diff.reshape(-1)[i].item():.3e}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 name: str = "tensor") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise (in float64); shapes must match
    and NaNs must sit at the same places."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(e)
    ok = ((a - e).abs() <= atol + rtol * e.abs()) | both_nan
    if not bool(ok.all()):
        raise AssertionError(f"{name}: not close (atol {atol:.3e}, rtol {rtol:.3e})\n"
                             + describe_diff(actual, expected, ~ok))


def max_abs_error(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |actual - ref64| in float64 (inf when either holds a NaN where the other does not)."""
    d = (actual.detach().double().cpu() - ref64.detach().double().cpu()).abs()
    return float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0


def lowp_bound(torch_lowp: torch.Tensor, ref64: torch.Tensor, k: float) -> float:
    """k x torch's own error at its precision against the float64 reference, floored at k x half an
    ulp (at torch_lowp's dtype) of the reference's largest magnitude."""
    half_ulp = torch.finfo(torch_lowp.dtype).eps / 2 * float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    return k * max(max_abs_error(torch_lowp, ref64), half_ulp)


def assert_within_torch_error(actual: torch.Tensor, torch_lowp: torch.Tensor, ref64: torch.Tensor, k: float,
                              name: str = "tensor") -> float:
    """Asserts max|actual - ref64| <= lowp_bound(torch_lowp, ref64, k); returns the ratio
    (our error) / (torch's error, floored as in lowp_bound)."""
    if tuple(actual.shape) != tuple(ref64.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(ref64.shape)}")
    bound = lowp_bound(torch_lowp, ref64, k)
    ours = max_abs_error(actual, ref64)
    ratio = ours / (bound / k) if bound > 0 else (0.0 if ours == 0 else float("inf"))
    if not ours <= bound:
        raise AssertionError(
            f"{name}: error {ours:.3e} vs float64 exceeds {k} x torch's own {torch_lowp.dtype} error "
            f"({max_abs_error(torch_lowp, ref64):.3e}; bound {bound:.3e}; ratio {ratio:.2f})\n"
            + describe_diff(actual, ref64))
    return ratio


def assert_op_and_reference_raise(op, reference, kwargs: dict, exc: type, pattern: str) -> None:
    """op(**kwargs) raises exc with a message matching the regular expression pattern, and so does the
    op's reference function unless kwargs hold a backend (which it does not take)."""
    import pytest

    with pytest.raises(exc, match=pattern):
        op(**kwargs)
    if "backend" not in kwargs:
        with pytest.raises(exc, match=pattern):
            reference(**kwargs)


def assert_compiles_whole(fn, args, op: str, *, atol: float = 0.0, **compile_kwargs) -> torch.Tensor:
    """torch._dynamo.explain(fn)(*args) finds one graph and no graph break, the graph calls the custom
    op ``op`` (as "cbdm_fast.ddpm_step"), and torch.compile(fn, fullgraph=True, **compile_kwargs)
    (default backend aot_eager: the fake implementations and AOT dispatch too) returns fn's result
    (bitwise, or within atol). Returns the compiled result."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1, f"{explained.graph_count} graphs"
        code = explained.graphs[0].code
        assert op in code, f"the graph does not call {op}:\n{code}"
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, **{"backend": "aot_eager", **compile_kwargs})(*args)
    finally:
        torch._dynamo.reset()
    assert_close(got, fn(*args), atol=atol, name=f"compiled vs eager ({op})")
    return got


def assert_cuda_graph_replays_match(fn, args, *, calls: int = 4, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """torch.compile(fn, fullgraph=True, mode="reduce-overhead") (inductor records a CUDA graph at an
    early call and replays it after), called ``calls`` times under no_grad with a fresh random args[0]
    each time: every result is close to fn's on the same inputs."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
    try:
        with torch.no_grad():
            for i in range(calls):
                args = (torch.randn_like(args[0]),) + tuple(args[1:])
                got = compiled(*args).clone()  # the graph's output buffer is reused by the next replay
                torch.testing.assert_close(got, fn(*args), rtol=rtol, atol=atol, msg=lambda m: f"call {i}: {m}")
    finally:
        torch._dynamo.reset()
