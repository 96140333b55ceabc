"""Triton W4A16 linear with group-wise scales and zero points.

BK divides the group size, so a K step reads one scale and zero per row. Tiles, warps, stages and
the split of K: ``_tiles.choose``. Instructions per weight byte, registers and load widths of each
path: tools/triton_aot.py.

- M = 1 (GEMV): the codes are read as int32 words [BN, BK/8] (8-byte loads); nibble j of a word is
  k = 8·word + j. The scale and zero come out of the sum over a word, Σ w·x = s·Σ q·x − z·s·Σ x, and
  Σ q·x = 16·(Σ f·x − Σ x) with f = 1 + q/16 — the code's bits put at the top of 1.0's mantissa, so a
  weight costs a shift, a LOP3 and an FFMA (sm_90: 0.33 warp instructions per weight byte, from
  0.49 for q·s − z·s per weight and 0.54 for byte-wise loads); fp32 throughout, reduced once at the
  end, w never rounded. Σ f·x is up to 2·Σ|x| before Σ x is taken off it and the difference is scaled
  by 16·s: a word's rounding error stays ≲ 2⁻¹⁶·s·Σ|x| (8 products, each ≤ 2|x|, rounded at 2⁻²⁴).
- M > 1: the packed bytes [BN, BK/2] split into their low (even k) and high (odd k) nibbles, decoded
  as q·s − z·s (``nibbles_f32``: the exponent trick), interleaved back into a [BN, BK] tile in x's
  dtype (cheaper than splitting x instead) and multiplied on tensor cores.
"""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, dot_nt, nibbles_f32, one_plus_code16, rows_and_output, split_k_tile, store_tile


@triton.jit
def word_products(words, s, zs, x_step, one_bits, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, BK/8]: Σ_j w_j·x_j over each int32 word of codes (nibble j: input x_step[j] of that word) for
    W = q·s − z·s — s·16·(Σ_j f_j·x_j − Σ_j x_j) − z·s·Σ_j x_j with f_j = 1 + q_j/16 (module doc)."""
    fx = tl.zeros((BN, BK // 8), dtype=tl.float32)
    xs = tl.zeros((1, BK // 8), dtype=tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(x_step + j).to(tl.float32)  # L1 hits
        fx += one_plus_code16(words, 4 * j, one_bits) * xj
        xs += xj
    return (16.0 * s) * (fx - xs) - zs * xs


@triton.jit
def decode_tile(p, s, zs, dtype: tl.constexpr):
    """[BN, BK] weights in `dtype` from the packed bytes p [BN, BK/2]: low (even k) and high (odd k) nibbles as
    q·s − z·s, interleaved back into k order."""
    lo, hi = nibbles_f32(p)
    return tl.interleave((lo * s - zs).to(dtype), (hi * s - zs).to(dtype))


@triton.jit
def _int4_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, K, G, k_split,
                        stride_qn, stride_xm, stride_ym, stride_ys, one_bits,
                        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GEMV: tl.constexpr):
    rm, rn, xmask, nmask, k_lo, k_hi = split_k_tile(M, N, K, k_split, BM, BN)
    x_rows = x_ptr + rm[:, None] * stride_xm
    if GEMV:  # q_ptr: the codes as int32 words [N, K/8]; nibble j of a word is k = 8·word + j
        rw = tl.arange(0, BK // 8)
        q_rows = q_ptr + rn[:, None].to(tl.int64) * stride_qn
        x_words = x_rows + 8 * rw[None, :]  # x[8·word]: the loop adds k0, then j as an immediate offset
        acc2 = tl.zeros((BN, BK // 8), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            words = tl.load(q_rows + (k0 // 8 + rw)[None, :], mask=nmask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zs = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)[:, None] * s
            acc2 += word_products(words, s, zs, x_words + k0, one_bits, BN, BK)
        acc = tl.sum(acc2, axis=1)[None, :]
    else:  # q_ptr: the packed bytes [N, K/2]
        rh = tl.arange(0, BK // 2)
        q_rows = q_ptr + rn[:, None].to(tl.int64) * stride_qn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):  # BK | GROUP | K: every step is whole and in one group
            p = tl.load(q_rows + (k0 // 2 + rh)[None, :], mask=nmask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zs = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)[:, None] * s
            w = decode_tile(p, s, zs, x_ptr.dtype.element_ty)
            x = tl.load(x_rows + (k0 + tl.arange(0, BK))[None, :], mask=xmask, other=0.0)  # pipelined copies
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, xmask, nmask, stride_ym, stride_ys, HAS_BIAS)


def int4_linear(x, qweight, scales, zeros, group_size, bias=None, split=None):
    """split: force the number of K splits (tests); None lets _tiles.choose decide."""
    k = x.shape[-1]
    n = qweight.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    # K steps: the largest power of two dividing the group size (≥ 32, the op's requirement)
    t = _tiles.choose(m, n, k, x.device, bk_limit=group_size & -group_size, split=split,
                      fp32=x.dtype == torch.float32)
    out = _tiles.output(t, y)
    bias_ptr, has_bias = _tiles.kernel_bias(t, bias, y)
    qweight = qweight.contiguous()
    q, stride_qn = (qweight.view(torch.int32), k // 8) if t.gemv else (qweight, k // 2)
    _int4_linear_kernel[_tiles.grid(t, m, n)](
        x2, q, scales, zeros, bias_ptr, out, m, n, k, scales.shape[1], t.k_split,
        stride_qn, x2.stride(0), n, m * n, 0x3F800000, GROUP=group_size, HAS_BIAS=has_bias,
        IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET, BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv,
        num_warps=t.warps, num_stages=t.stages)
    return _tiles.finish(t, out, y, bias).reshape(*x.shape[:-1], n)
