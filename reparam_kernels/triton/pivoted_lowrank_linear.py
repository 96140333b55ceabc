"""Triton pivoted low-rank linear, two launches like the plain low-rank Triton backend (and a third
that sums the first one's partials when its K − r is split, ``_tiles``):

1. t[M, r] = x[:, perm[:r]] + x[:, perm[r:]] @ w.T, in fp32 — x's columns are gathered inside the
   kernel (perm is read once per K tile), so no permuted copy of x is made; the first split adds the
   pivot columns;
2. y = t @ u.T + bias — the shared NT GEMM (t rounded to u's dtype before the dot, as in lowrank_linear).

The CUDA backend (csrc/pivoted_lowrank_linear.cu) does it in one launch; this one serves fp32 and
machines without the extension.
"""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, acc_init, acc_result, acc_step, rows_and_output, split_k_tile, store_tile
from ._matmul_nt import matmul_nt


@triton.jit
def _pivot_t_kernel(x_ptr, w_ptr, perm_ptr, t_ptr, M, R, KR, k_split, stride_xm, stride_wr, stride_ts,
                    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GEMV: tl.constexpr):
    rm, rr, xmask, rmask, k_lo, k_hi = split_k_tile(M, R, KR, k_split, BM, BN)  # BN: a tile of t's r columns
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rr[:, None].to(tl.int64) * stride_wr
    acc = acc_init(BM, BN, BK, GEMV)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < KR
        cols = tl.load(perm_ptr + R + kk, mask=kmask, other=0)  # x columns of this tile of w's columns
        a = tl.load(x_rows + cols[None, :], mask=xmask & kmask[None, :], other=0.0).to(w_ptr.dtype.element_ty)
        b = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = acc_step(acc, a, b, IEEE, DOT_F32, GEMV)
    acc = acc_result(acc, GEMV)
    if tl.program_id(1) == 0:  # the pivot columns (v's identity block), added by the first split only
        piv = tl.load(perm_ptr + rr, mask=rmask, other=0)
        acc += tl.load(x_rows + piv[None, :], mask=xmask & rmask[None, :], other=0.0).to(tl.float32)
    store_tile(acc, t_ptr, t_ptr, rm, rr, xmask, rmask, R, stride_ts, False)


def pivoted_lowrank_linear(x, u, w, perm, bias=None, split=None):
    """split: force the number of splits of the first product's K − r (tests); None lets _tiles.choose decide."""
    r = u.shape[1]
    x2, t = rows_and_output(x, r, torch.float32)
    M, kr = x2.shape[0], w.shape[1]
    # rank = K leaves w empty (its pointer may be null on a GPU): pass x, which the loop never reads then
    w = w.contiguous() if kr > 0 else x2
    tiles = _tiles.choose(M, r, kr, x.device, split=split, fp32=w.dtype == torch.float32)
    out = _tiles.output(tiles, t)
    _pivot_t_kernel[_tiles.grid(tiles, M, r)](
        x2, w, perm.contiguous(), out, M, r, kr, tiles.k_split, x2.stride(0), w.stride(0), M * r,
        IEEE=w.dtype == torch.float32, DOT_F32=INTERPRET, BM=tiles.bm, BN=tiles.bn, BK=tiles.bk, GEMV=tiles.gemv,
        num_warps=tiles.warps, num_stages=tiles.stages)
    t = _tiles.finish(tiles, out, t, None)
    y = matmul_nt(t, u.contiguous(), bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], u.shape[0])
