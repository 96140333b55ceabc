"""Triton lookup-table linear: 4-bit codes (two per byte, low nibble = even k) decoded
through the 16-entry table of each row's group, W[n, k] = lut[n // rows_per_table, code],
then multiplied as in int4_linear (same tiles, GEMV form at M = 1, split-K; ``_tiles``).

Each program loads its rows' tables once, [BN, 16], before the K loop and decodes with
tl.gather from those registers (warp shuffles on the GPU); the codes are read once, [BN, BK/2]
contiguous, and split into their two nibbles.
"""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, acc_init, acc_result, dot_nt, rows_and_output, split_k_tile, store_tile


@triton.jit
def decode_nibbles(table, p):
    """Code bytes p [BN, BK/2] (int32) through their rows' tables [BN, 16]: the weights of the low nibbles (even k)
    and of the high nibbles (odd k)."""
    return tl.gather(table, p & 0xF, axis=1), tl.gather(table, (p >> 4) & 0xF, axis=1)


@triton.jit
def _lut_linear_kernel(x_ptr, c_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, rows_per_table, k_split,
                       stride_qn, stride_xm, stride_ym, stride_ys,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GEMV: tl.constexpr):
    rm, rn, xmask, nmask, k_lo, k_hi = split_k_tile(M, N, K, k_split, BM, BN)
    rh = tl.arange(0, BK // 2)
    table = tl.load(lut_ptr + (rn // rows_per_table)[:, None] * 16 + tl.arange(0, 16)[None, :],
                    mask=nmask[:, None], other=0.0).to(tl.float32)
    c_rows = c_ptr + rn[:, None].to(tl.int64) * stride_qn
    x_rows = x_ptr + rm[:, None] * stride_xm
    acc = acc_init(BM, BN, BK // 2, GEMV)  # GEMV: [BN, BK/2], the two nibbles' products summed in
    for k0 in range(k_lo, k_hi, BK):
        kh = k0 // 2 + rh  # byte index: codes of k = 2·kh (low nibble) and 2·kh + 1
        kmask = kh < stride_qn  # the row's K / 2 bytes (compared in bytes: the loads vectorize)
        p = tl.load(c_rows + kh[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(tl.int32)
        w_lo, w_hi = decode_nibbles(table, p)
        if GEMV:  # one row of x: two strided loads (they hit L1)
            x_even = tl.load(x_rows + (2 * kh)[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
            x_odd = tl.load(x_rows + (2 * kh + 1)[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
            acc += w_lo * x_even + w_hi * x_odd
        else:  # x's contiguous [BM, BK] tile, the decoded nibbles interleaved to match
            kk = k0 + tl.arange(0, BK)
            x = tl.load(x_rows + kk[None, :], mask=xmask & (kk < K)[None, :], other=0.0)
            w = tl.interleave(w_lo.to(x_ptr.dtype.element_ty), w_hi.to(x_ptr.dtype.element_ty))
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
    acc = acc_result(acc, GEMV)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, xmask, nmask, stride_ym, stride_ys, HAS_BIAS)


def lut_linear(x, codes, lut, bias=None, split=None):
    """split: force the number of K splits (tests); None lets _tiles.choose decide."""
    k = x.shape[-1]
    n = codes.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    t = _tiles.choose(m, n, k, x.device, split=split, fp32=x.dtype == torch.float32, gemv_bk=64)
    out = _tiles.output(t, y)
    bias_ptr, has_bias = _tiles.kernel_bias(t, bias, y)
    _lut_linear_kernel[_tiles.grid(t, m, n)](
        x2, codes, lut, bias_ptr, out, m, n, k, n // lut.shape[0], t.k_split,
        k // 2, x2.stride(0), n, m * n, HAS_BIAS=has_bias,
        IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET, BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv,
        num_warps=t.warps, num_stages=t.stages)
    return _tiles.finish(t, out, y, bias).reshape(*x.shape[:-1], n)
