"""Triton grouped W4A16: every expert of a mixture-of-experts layer in one launch (ops/grouped_int4_linear.py).

Rows, experts and the two maps of programs to row tiles: ``_grouped.py``. Two kernels, int4_linear's two K
loops: at most one row an expert on average (decode) the GEMV (``word_products``: the codes as int32 words, fp32
products reduced once), one program an expert and column tile running its rows one after the other; above it
the tensor-core path (packed bytes → low and high nibbles → q·s − z·s interleaved into a [BN, BK] tile in x's
dtype, tl.dot). Not tuned on a GPU yet; no split of K.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_nt, store_tile
from ._grouped import Plan, expert_and_first_row, launch, rows_and_cols
from .int4_linear import decode_tile, word_products


@triton.jit
def _grouped_int4_kernel(x_ptr, off_ptr, ends_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, T, N, K, E, tiles_m,
                         stride_xm, stride_ym, G, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, PACKED: tl.constexpr, SEARCH: tl.constexpr):
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:  # this expert has rows in this tile: only then are its weights read
        e64 = e.to(tl.int64)
        rm, rn, xmask, nmask = rows_and_cols(r0, hi, N, BM, BN)
        rh = tl.arange(0, BK // 2)
        q_rows = q_ptr + e64 * N * (K // 2) + rn[:, None].to(tl.int64) * (K // 2)
        sz_rows = e64 * N * G + rn * G
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # BK | GROUP | K: every step is whole and in one group
            p = tl.load(q_rows + (k0 // 2 + rh)[None, :], mask=nmask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zs = tl.load(z_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None] * s
            w = decode_tile(p, s, zs, x_ptr.dtype.element_ty)
            x = tl.load(x_rows + (k0 + tl.arange(0, BK))[None, :], mask=xmask, other=0.0)
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


@triton.jit
def _grouped_int4_gemv_kernel(x_ptr, off_ptr, ends_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, T, N, K, E, tiles_m,
                              stride_xm, stride_ym, G, one_bits, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                              IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, PACKED: tl.constexpr, SEARCH: tl.constexpr):
    """q_ptr: the codes as int32 words [E, N, K/8]; nibble j of a word is k = 8·word + j."""
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    e64 = e.to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rn < N
    rw = tl.arange(0, BK // 8)
    q_rows = q_ptr + e64 * N * (K // 8) + rn[:, None].to(tl.int64) * (K // 8)
    sz_rows = e64 * N * G + rn * G
    for r in range(r0, hi):  # the expert's rows (decode: one; an expert without rows: none, no weight read)
        x_words = x_ptr + r * stride_xm + 8 * rw[None, :]  # (r < T ≤ E rows where the plan takes the GEMV)
        acc2 = tl.zeros((BN, BK // 8), dtype=tl.float32)
        for k0 in range(0, K, BK):  # BK | GROUP | K: every step is whole and in one group
            words = tl.load(q_rows + (k0 // 8 + rw)[None, :], mask=nmask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zs = tl.load(z_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None] * s
            acc2 += word_products(words, s, zs, x_words + k0, one_bits, BN, BK)
        acc = tl.sum(acc2, axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e64 * N + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def plan(rows, experts, n, k, group_size, fp32=False, packed=None, gemv="auto"):
    """K steps: the largest power of two dividing the group size, as int4_linear's."""
    return Plan(rows, experts, n, k, bk_limit=group_size & -group_size, fp32=fp32, packed=packed, gemv=gemv)


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None, packed=None, gemv="auto"):
    """packed, gemv: force the row-tile map or the GEMV form (tests); by default chosen from the shapes."""
    experts, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    p = plan(x.shape[0], experts, n, k, group_size, x.dtype == torch.float32, packed, gemv)
    if p.gemv:  # the codes as int32 words (K is a multiple of 32)
        return launch(_grouped_int4_gemv_kernel, p, x, expert_offsets, (qweight.contiguous().view(torch.int32),
                      scales, zeros), bias, n, k, (k // group_size, 0x3F800000), GROUP=group_size)
    return launch(_grouped_int4_kernel, p, x, expert_offsets, (qweight, scales, zeros), bias, n, k,
                  (k // group_size,), GROUP=group_size)
