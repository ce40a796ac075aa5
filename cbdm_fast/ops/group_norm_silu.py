"""Fused GroupNorm + SiLU with an optional per-channel add before the norm (a ResBlock's time embedding).

    u = x + add[:, :, None, None]                       (add: (N, C), optional)
    per (n, group): mean, rstd = 1 / sqrt(var + eps)    (biased variance; fp32 whatever the I/O dtype)
    z = (u - mean) * rstd * weight[c] + bias[c]
    y = silu(z) if act else z                           (act=False: plain GroupNorm)

Backends:
  * "triton": the kernels in cbdm_fast.kernels.group_norm_silu (one forward kernel; one backward kernel
    plus a small kernel that sums the dweight/dbias partials over N in a fixed order). While
    torch.compile traces, they are reached through the custom op ``torch.ops.cbdm_fast.group_norm_silu``
    (forward: returns y and the fp32 mean / rstd saved for the backward) and
    ``torch.ops.cbdm_fast.group_norm_silu_backward``, with register_fake and register_autograd, so
    torch.compile(fullgraph=True) sees no graph break; in eager mode an autograd.Function calls the
    same kernels directly (no custom-op dispatch overhead; the same results). Runs on CUDA tensors,
    and on CPU tensors when the Triton interpreter is on (TRITON_INTERPRET=1 set before triton's
    first import; that is how CI exercises the kernels). fp32, bf16, fp16.
  * "reference": ``group_norm_silu_reference``: (x + add) -> F.group_norm -> F.silu in x's dtype, the
    same calls as the UNet's nn.GroupNorm + Swish, so it is bit-identical to the unfused model
    (forward and, through plain autograd, backward).
  * "auto" (default): "triton" when it can run these inputs, else "reference".
Called directly where the kernels cannot run (CPU without the interpreter, or no triton), the custom
op itself runs the reference for y (plus fp32 statistics) and an fp32 torch transcription of the
kernel's backward formulas.

Layout: x may be NCHW-contiguous or channels-last (the permutation (N, *spatial, C) contiguous);
y and dx come back in x's layout. Any other strides (a slice, say) are accepted and copied to
NCHW-contiguous first; y is then NCHW-contiguous. weight, bias and add are made contiguous.

Errors (the message names the argument): TypeError for a non-tensor, a non-floating dtype, weight
or bias neither x's dtype nor float32, add not x's dtype, num_groups not an int, eps not a real
number, act not a bool, an unknown backend type; ValueError for x of rank < 3, num_groups <= 0,
C not divisible by num_groups, weight / bias shape != (C,), add shape != (N, C), tensors on
different devices, eps <= 0 or not finite, an unknown backend name. backend="triton" where the
kernels cannot run raises RuntimeError (no triton, or a CPU tensor without TRITON_INTERPRET=1) or
TypeError (float64).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ._common import (TRITON_BACKENDS, TRITON_DTYPES, channels_last_contiguous, check_backend, check_device,
                      check_int, check_real, check_tensor, kernel_module, triton_blocker, use_triton)

__all__ = ["group_norm_silu", "group_norm_silu_reference", "BACKENDS"]

BACKENDS = TRITON_BACKENDS
_OP = "group_norm_silu"
_FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)


def _kernels():
    return kernel_module("group_norm_silu")


# ----------------------------------------------------------------------------------------------
# validation


def _validate(x, weight, bias, num_groups, eps, add, act, fn: str = _OP) -> None:
    for name, v in (("x", x), ("weight", weight), ("bias", bias)):
        check_tensor(fn, name, v)
    check_tensor(fn, "add", add, optional=True)
    check_int(fn, "num_groups", num_groups)
    check_real(fn, "eps", eps, 0.0, low_open=True)
    if not isinstance(act, bool):
        raise TypeError(f"{fn}: act must be a bool, got {type(act).__name__}")

    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, bfloat16, float16 (or float64 for the reference), got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"{fn}: x must have shape (N, C, *spatial) with at least one spatial dimension, "
                         f"got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if num_groups <= 0:
        raise ValueError(f"{fn}: num_groups must be positive, got {num_groups}")
    if C % num_groups != 0:
        raise ValueError(f"{fn}: the {C} channels of x are not divisible by num_groups={num_groups}")
    for name, v in (("weight", weight), ("bias", bias)):
        if v.dtype != x.dtype and v.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must have x's dtype ({x.dtype}) or float32, got {v.dtype}")
        if tuple(v.shape) != (C,):
            raise ValueError(f"{fn}: {name} must have shape ({C},) (the channels of x), got {tuple(v.shape)}")
        check_device(fn, name, v, "x", x)
    if add is not None:
        if add.dtype != x.dtype:
            raise TypeError(f"{fn}: add must have x's dtype ({x.dtype}), got {add.dtype}")
        if tuple(add.shape) != (N, C):
            raise ValueError(f"{fn}: add must have shape ({N}, {C}) (x's batch and channels), got {tuple(add.shape)}")
        check_device(fn, "add", add, "x", x)


def _dense(x: Tensor) -> Tuple[Tensor, bool]:
    """(x, channels_last) with x in a layout the kernels take: NCHW- or channels-last-contiguous
    (copied to NCHW when neither)."""
    if x.is_contiguous():
        return x, False
    if channels_last_contiguous(x):
        return x, True
    return x.contiguous(), False


# ----------------------------------------------------------------------------------------------
# the reference


def _reference(x, weight, bias, num_groups, eps, add, act):
    u = x if add is None else x + add.view(add.shape + (1,) * (x.dim() - 2))
    z = F.group_norm(u, num_groups, weight, bias, eps)
    return F.silu(z) if act else z


def group_norm_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-5,
                              add: Optional[Tensor] = None, act: bool = True) -> Tensor:
    """(x + add[:, :, None, None]) -> F.group_norm -> F.silu, in x's dtype: the UNet's unfused chain
    (nn.GroupNorm, then Swish), bit for bit. Differentiable by plain autograd. Accepts float64."""
    _validate(x, weight, bias, num_groups, eps, add, act, "group_norm_silu_reference")
    return _reference(x, weight, bias, num_groups, float(eps), add, act)


def _torch_stats(x, add, num_groups, eps):
    """fp32 (mean, rstd), each (N, G), of u = x + add."""
    N, C = x.shape[0], x.shape[1]
    u = x.float().reshape(N, C, -1)
    if add is not None:
        u = u + add.float()[:, :, None]
    var, mean = torch.var_mean(u.reshape(N, num_groups, -1), dim=2, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _torch_backward(dy, x, weight, bias, add, mean, rstd, num_groups, act):
    """The kernel's backward formulas in fp32 torch (see kernels/group_norm_silu.py)."""
    N, C = x.shape[0], x.shape[1]
    G = num_groups
    u = x.float().reshape(N, G, C // G, -1)
    if add is not None:
        u = u + add.float().reshape(N, G, C // G, 1)
    xhat = (u - mean[:, :, None, None]) * rstd[:, :, None, None]
    w = weight.float().reshape(1, G, C // G, 1)
    dz = dy.float().reshape(N, G, C // G, -1)
    if act:
        z = xhat * w + bias.float().reshape(1, G, C // G, 1)
        s = torch.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    dbias = dz.sum(dim=(0, 3)).reshape(C)
    dweight = (dz * xhat).sum(dim=(0, 3)).reshape(C)
    dxhat = dz * w
    c1 = dxhat.mean(dim=(2, 3), keepdim=True)
    c2 = (dxhat * xhat).mean(dim=(2, 3), keepdim=True)
    du = rstd[:, :, None, None] * (dxhat - c1 - xhat * c2)
    dx = torch.empty_like(x).copy_(du.reshape(x.shape))
    dadd = du.sum(dim=3).reshape(N, C).to(add.dtype) if add is not None else x.new_empty(0)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype), dadd


# ----------------------------------------------------------------------------------------------
# the kernels' backward, shared by the custom op and the eager autograd.Function


def _kernel_backward(dy, xd, weight, bias, add, mean, rstd, num_groups, act, channels_last):
    """The backward kernels on dense xd (dy converted to xd's layout when it has another)."""
    if not (channels_last_contiguous(dy) if channels_last else dy.is_contiguous()):
        dy = torch.empty_like(xd).copy_(dy)
    return _kernels().group_norm_silu_bwd(
        dy, xd, weight.contiguous(), bias.contiguous(), None if add is None else add.contiguous(),
        mean.contiguous(), rstd.contiguous(), num_groups, act, channels_last)


class _EagerFn(torch.autograd.Function):
    """The eager-mode path of the Triton backend: the same kernels as the custom op, called directly.
    torch.library custom ops cost tens of microseconds of Python dispatch per call (forward and
    backward); outside torch.compile that overhead buys nothing, so group_norm_silu uses this
    Function there and the custom op (which torch.compile needs) while compiling. x is dense and
    weight, bias, add contiguous (group_norm_silu guarantees it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, num_groups, eps, act, channels_last):
        y, mean, rstd = _kernels().group_norm_silu_fwd(x, weight, bias, add, num_groups, eps, act, channels_last)
        ctx.save_for_backward(x, weight, bias, add, mean, rstd)
        ctx.num_groups, ctx.act, ctx.channels_last = num_groups, act, channels_last
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, add, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias, dadd = _kernel_backward(dy, x, weight, bias, add, mean, rstd, ctx.num_groups,
                                                    ctx.act, ctx.channels_last)
        return dx, dweight, dbias, dadd, None, None, None, None


# ----------------------------------------------------------------------------------------------
# the custom ops (torch.library): opaque to torch.compile, with fake (meta) implementations


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with the strides torch.empty_like(x) has (what the fake implementation promises)."""
    out = torch.empty_like(x)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)


@torch.library.custom_op("cbdm_fast::group_norm_silu", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Tensor, add: Optional[Tensor], num_groups: int, eps: float,
            act: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean (N, G) fp32, rstd (N, G) fp32). y has the strides of torch.empty_like(x)."""
    if triton_blocker(_OP, x) is None:
        xd, channels_last = _dense(x)
        y, mean, rstd = _kernels().group_norm_silu_fwd(
            xd, weight.contiguous(), bias.contiguous(), None if add is None else add.contiguous(),
            num_groups, eps, act, channels_last)
        return (y if xd is x else _like(y, x)), mean, rstd
    y = _reference(x, weight, bias, num_groups, eps, add, act)
    mean, rstd = _torch_stats(x, add, num_groups, eps)
    return _like(y, x), mean, rstd


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, add, num_groups, eps, act):
    N = x.shape[0]
    stats = x.new_empty((N, num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("cbdm_fast::group_norm_silu_backward", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, add: Optional[Tensor], mean: Tensor, rstd: Tensor,
            num_groups: int, act: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx like x, dweight, dbias, dadd (N, C), or an empty tensor when add is None)."""
    if triton_blocker(_OP, x) is None:
        xd, channels_last = _dense(x)
        dx, dweight, dbias, dadd = _kernel_backward(dy, xd, weight, bias, add, mean, rstd, num_groups, act,
                                                    channels_last)
        return (dx if xd is x else _like(dx, x)), dweight, dbias, dadd if dadd is not None else x.new_empty(0)
    return _torch_backward(dy, x, weight, bias, add, mean, rstd, num_groups, act)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, bias, add, mean, rstd, num_groups, act):
    dadd = torch.empty_like(add) if add is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), dadd


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, mean, rstd)
    ctx.num_groups, ctx.act, ctx.has_add = num_groups, act, add is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dadd = torch.ops.cbdm_fast.group_norm_silu_backward(
        dy, x, weight, bias, add, mean, rstd, ctx.num_groups, ctx.act)
    return dx, dweight, dbias, (dadd if ctx.has_add else None), None, None, None


torch.library.register_autograd("cbdm_fast::group_norm_silu", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# the public op


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-5,
                    add: Optional[Tensor] = None, act: bool = True, backend: str = "auto") -> Tensor:
    """y = silu(group_norm(x + add[:, :, None, None])) (act=False: no SiLU); see the module docstring.

    x: (N, C, *spatial), fp32 / bf16 / fp16 (fp64: reference only), NCHW or channels-last.
    weight, bias: (C,), x's dtype or fp32. add: (N, C) of x's dtype, or None. Returns y in x's dtype
    and layout. Differentiable in x, weight, bias and add. backend: "auto" | "triton" | "reference".
    """
    check_backend(_OP, backend, BACKENDS)
    _validate(x, weight, bias, num_groups, eps, add, act)
    num_groups, eps = int(num_groups), float(eps)
    if not use_triton(_OP, x, backend) or x.numel() == 0:
        return _reference(x, weight, bias, num_groups, eps, add, act)
    x, channels_last = _dense(x)
    weight, bias = weight.contiguous(), bias.contiguous()
    add = None if add is None else add.contiguous()
    if torch.compiler.is_compiling():  # the custom op: no graph break
        return torch.ops.cbdm_fast.group_norm_silu(x, weight, bias, add, num_groups, eps, act)[0]
    return _EagerFn.apply(x, weight, bias, add, num_groups, eps, act, channels_last)
