"""Triton vector-quantized linear: W[n, k] = codebooks[n // rows_per_book, codes[n, k // D], k % D],
decoded tile by tile in registers and multiplied as in int8_linear (same tiles, GEMV form at M = 1,
split-K; ``_tiles``).

The codebook of the row's group, E·D values of x's dtype, stays in L1 (1 KB for 256 pairs in fp16): the
weights are gathered from it. The GEMV (D a power of two) reads a [BN, BK / D] block of codes, contiguous
and wide, and for each coordinate j < D multiplies the gathered entries with x's inputs D·s + j. The
tl.dot tiles (and the GEMV for other D) gather each weight of the [BN, BK] tile: its code (the same byte
for the D weights of a sub-vector), then its entry. D is a constant of the kernel, so k // D and k % D
are shifts for D = 2, 4, 8.
"""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, acc_init, acc_result, acc_step, rows_and_output, split_k_tile, store_tile


@triton.jit
def gather_tile(c_rows, books, kk, wmask, D: tl.constexpr):
    """The [BN, BK] weight tile at inputs kk: each weight's code (one byte for the D weights of a sub-vector),
    then its entry in the row's codebook."""
    code = tl.load(c_rows + (kk // D)[None, :], mask=wmask, other=0).to(tl.int32)
    return tl.load(books + code * D + (kk % D)[None, :], mask=wmask, other=0.0)


@triton.jit
def _vq_linear_kernel(x_ptr, c_ptr, book_ptr, bias_ptr, y_ptr, M, N, K, rows_per_book, book_stride, k_split,
                      stride_xm, stride_ym, stride_ys, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      DOT_F32: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GEMV: tl.constexpr):
    rm, rn, xmask, nmask, k_lo, k_hi = split_k_tile(M, N, K, k_split, BM, BN)
    c_rows = c_ptr + rn[:, None].to(tl.int64) * (K // D)
    books = book_ptr + (rn // rows_per_book)[:, None] * book_stride  # each row's codebook, E·D values
    x_rows = x_ptr + rm[:, None] * stride_xm
    if GEMV and (D & (D - 1)) == 0:  # a power of two: BK / D codes a step, a split starts on a code
        rs = tl.arange(0, BK // D)
        acc = tl.zeros((BN, BK // D), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            s = k0 // D + rs
            smask = s < K // D
            cmask = nmask[:, None] & smask[None, :]
            code = tl.load(c_rows + s[None, :], mask=cmask, other=0).to(tl.int32)
            for j in tl.static_range(D):  # coordinate j of every sub-vector against x's inputs D·s + j (L1)
                w = tl.load(books + code * D + j, mask=cmask, other=0.0).to(tl.float32)
                x = tl.load(x_rows + (s * D + j)[None, :], mask=smask[None, :], other=0.0).to(tl.float32)
                acc += w * x
        acc = tl.sum(acc, axis=1)[None, :]
    else:  # each weight of the [BN, BK] tile gathers its code, then its entry
        rk = tl.arange(0, BK)
        acc = acc_init(BM, BN, BK, GEMV)
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + rk
            kmask = kk < K
            w = gather_tile(c_rows, books, kk, nmask[:, None] & kmask[None, :], D)
            x = tl.load(x_rows + kk[None, :], mask=xmask & kmask[None, :], other=0.0)
            acc = acc_step(acc, x, w, IEEE, DOT_F32, GEMV)
        acc = acc_result(acc, GEMV)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, xmask, nmask, stride_ym, stride_ys, HAS_BIAS)


def vq_linear(x, codes, codebooks, bias=None, split=None):
    """split: force the number of K splits (tests); None lets _tiles.choose decide."""
    k = x.shape[-1]
    n = codes.shape[0]
    nl, ne, d = codebooks.shape
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    t = _tiles.choose(m, n, k, x.device, split=split, fp32=x.dtype == torch.float32, gemv_bk=64)
    out = _tiles.output(t, y)
    bias_ptr, has_bias = _tiles.kernel_bias(t, bias, y)
    _vq_linear_kernel[_tiles.grid(t, m, n)](
        x2, codes, codebooks, bias_ptr, out, m, n, k, n // nl, ne * d, t.k_split, x2.stride(0), n,
        m * n, HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET, D=d,
        BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv, num_warps=t.warps, num_stages=t.stages)
    return _tiles.finish(t, out, y, bias).reshape(*x.shape[:-1], n)
