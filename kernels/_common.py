"""What the Triton kernel files share: the interpreter flag, the fma launch option, the rounding store and
the elementwise block.

INTERPRETED: True when triton.jit built the kernels for the Triton interpreter (TRITON_INTERPRET=1 set
before this module was first imported); they then run on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["INTERPRETED", "FMA", "MAX_BLOCK", "to_bf16_rne", "store_cast", "manual_bf16", "block_for"]

MAX_BLOCK = 1024  # elements per program of the elementwise kernels (q_sample, cb_loss)

# Launch option of the kernels whose float math may contract a * b + c into one fma (faster, rounded once).
# Given at every launch because Triton's default turns from on to off in 3.10. q_sample launches with
# enable_fp_fusion=False instead: its fp32 results are bit-identical to torch's.
FMA = {"enable_fp_fusion": True}


@triton.jit
def to_bf16_rne(y):
    """float32 -> bfloat16 with round-to-nearest-even, done with integer ops. Used only under the
    Triton interpreter, whose fp32 -> bf16 cast truncates (the compiled cast rounds to nearest even)."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(y != y, y.to(tl.bfloat16), r)  # NaN: keep it a NaN


@triton.jit
def store_cast(ptr, y, mask, MANUAL_BF16: tl.constexpr):
    """Store float32 ``y`` into ``ptr``'s element type, rounding to nearest even."""
    if MANUAL_BF16:
        tl.store(ptr, to_bf16_rne(y), mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


INTERPRETED = isinstance(to_bf16_rne, InterpretedFunction)


def manual_bf16(dtype: torch.dtype) -> bool:
    """The MANUAL_BF16 flag of store_cast for an output of ``dtype``."""
    return dtype == torch.bfloat16 and INTERPRETED


def block_for(N: int, block: Optional[int] = None) -> int:
    """Elements per program of an elementwise kernel over samples of N elements: the next power of two
    >= N, capped at MAX_BLOCK (``block`` overrides, for tests that need several blocks per sample)."""
    if block is not None:
        return block
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(N)))
