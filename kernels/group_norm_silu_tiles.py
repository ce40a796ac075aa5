"""The tile arithmetic of kernels/group_norm_silu.py's "groups" kernels, as Triton device functions: a
tile is [BLOCK_C, BLOCK_L] (NCHW) or [BLOCK_L, BLOCK_C] (channels-last, CL), its channel axis GPP groups
of CG_P2 slots (see that file's docstring). Inlined into the kernels that call them."""
import triton
import triton.language as tl


@triton.jit
def _program_groups(C, L, NGB, GPP: tl.constexpr):
    """This program (pid = n * NGB + i) holds groups [g0, g0 + GPP) of sample n: (n, g0, the first
    element of sample n as an int64 offset)."""
    pid = tl.program_id(0)
    n = pid // NGB
    return n, (pid % NGB) * GPP, n.to(tl.int64) * C * L


@triton.jit
def _bc(v, CL: tl.constexpr):
    """A per-channel vector (BLOCK_C,) broadcast against a tile."""
    if CL:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _lsum(t, CL: tl.constexpr):
    """Sum of a tile over its positions: (BLOCK_C,)."""
    if CL:
        return tl.sum(t, axis=0)
    else:
        return tl.sum(t, axis=1)


@triton.jit
def _gsum(v, k, GPP: tl.constexpr):
    """Per-channel vector -> for each channel slot, the sum of v over the slots of its group."""
    if GPP == 1:
        return tl.zeros_like(v) + tl.sum(v, axis=0)
    else:
        same = k[:, None] == k[None, :]
        return tl.sum(tl.where(same, v[None, :], 0.0), axis=1)


@triton.jit
def _chan(g0, c0, Cg, G, GPP: tl.constexpr, CG_P2: tl.constexpr):
    """Channel slots of a tile: (channel index c, group-in-block k, valid mask), each (GPP*CG_P2,)."""
    j = tl.arange(0, GPP * CG_P2)
    k = j // CG_P2
    cc = c0 + j % CG_P2
    cmask = (cc < Cg) & (g0 + k < G)
    c = (g0 + k) * Cg + cc
    return c, k, cmask


@triton.jit
def _offs(c, cmask, l0, C, L, CL: tl.constexpr, BLOCK_L: tl.constexpr):
    """Element offsets within the sample and element mask of the tile at positions [l0, l0+BLOCK_L)."""
    ll = l0 + tl.arange(0, BLOCK_L)
    lmask = ll < L
    if CL:
        off = ll[:, None] * C + c[None, :]
        mask = lmask[:, None] & cmask[None, :]
    else:
        off = c[:, None] * L + ll[None, :]
        mask = cmask[:, None] & lmask[None, :]
    return off, mask


@triton.jit
def _load_add(add_ptr, n, c, cmask, C, HAS_ADD: tl.constexpr):
    """add[n, c] as a float32 (BLOCK_C,) vector (0 where masked), or 0.0 without add."""
    if HAS_ADD:
        return tl.load(add_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _chan_params(add_ptr, w_ptr, b_ptr, n, g0, c0, C, Cg, G, HAS_ADD: tl.constexpr, GPP: tl.constexpr,
                 CG_P2: tl.constexpr):
    """_chan's channel slots (c, k, cmask) of channel chunk c0, with what each slot needs: add[n, c]
    (_load_add), weight[c] and bias[c] as float32 vectors (0 where masked)."""
    c, k, cmask = _chan(g0, c0, Cg, G, GPP, CG_P2)
    a = _load_add(add_ptr, n, c, cmask, C, HAS_ADD)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return c, k, cmask, a, w, b


@triton.jit
def _load_u(x_ptr, off, mask, a, CL: tl.constexpr, HAS_ADD: tl.constexpr):
    """u = x + add[n, c] for one tile, in float32 (0 where masked); a: (BLOCK_C,) fp32 add row."""
    u = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        u = tl.where(mask, u + _bc(a, CL), 0.0)
    return u


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise merge of two (mean, M2, count) summaries; safe for empty ones."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n
