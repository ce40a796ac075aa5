"""What the patch_model tests share: a patched model against its unpatched copy, in fp32 on the CPU.
Outputs must agree within OUT_TOL of the largest reference value, gradients within GRAD_RTOL relative and
GRAD_ATOL of the largest reference gradient (the fused ops reorder float sums, nothing more)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from assert_helpers import assert_close

OUT_TOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def assert_out_close(out: torch.Tensor, ref: torch.Tensor, name: str = "out") -> None:
    assert_close(out, ref, rtol=OUT_TOL, atol=OUT_TOL * ref.abs().max().item(), name=name)


def assert_grad_close(grad: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert_close(grad, ref, rtol=GRAD_RTOL, atol=GRAD_ATOL * ref.abs().max().item(), name=name)


def assert_param_grads_close(model: nn.Module, ref: nn.Module) -> float:
    """The same parameters have gradients in both (at least one), each within GRAD_RTOL / GRAD_ATOL x the
    largest reference gradient. Returns the worst error over that largest gradient."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    big = max(g.abs().max().item() for g in ref_grads.values())
    worst = 0.0
    for n, g in ref_grads.items():
        assert_close(grads[n], g, rtol=GRAD_RTOL, atol=GRAD_ATOL * big, name=f"grad {n}")
        worst = max(worst, (grads[n] - g).abs().max().item() / big)
    return worst


def assert_forward_backward_close(model: nn.Module, ref: nn.Module, inputs: Sequence[torch.Tensor],
                                  ref_inputs: Sequence[torch.Tensor], names: Sequence[str],
                                  call: Optional[Callable] = None) -> float:
    """call(model, *inputs) against call(ref, *ref_inputs) (inputs that require grad): the outputs, then,
    after a backward of the same random upstream gradient through both, each input's gradient (named by
    ``names``) and every parameter's. Returns assert_param_grads_close's worst error."""
    call = call or (lambda m, *args: m(*args))
    out, out_ref = call(model, *inputs), call(ref, *ref_inputs)
    assert_out_close(out, out_ref)
    dy = torch.randn_like(out_ref)
    out.backward(dy)
    out_ref.backward(dy)
    for a, b, name in zip(inputs, ref_inputs, names, strict=True):
        assert_grad_close(a.grad, b.grad, name)
    return assert_param_grads_close(model, ref)
