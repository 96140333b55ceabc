"""Triton grouped vector-quantized linear: every expert of a mixture-of-experts layer in one launch
(ops/grouped_vq_linear.py; GPTVQ's experts).

Rows, experts and the two maps of programs to row tiles: ``_grouped.py``. The K loop is vq_linear's tl.dot
path: each weight of the [BN, BK] tile gathers its code, then its entry from the row group's codebook of its
expert (E·d values of x's dtype, in L1). Not tuned on a GPU yet: no GEMV form for one row an expert, no split
of K.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_nt, store_tile
from ._grouped import Plan, expert_and_first_row, launch, rows_and_cols
from .vq_linear import gather_tile


@triton.jit
def _grouped_vq_kernel(x_ptr, off_ptr, ends_ptr, c_ptr, book_ptr, bias_ptr, y_ptr, T, N, K, E, tiles_m,
                       stride_xm, stride_ym, rows_per_book, book_stride, books_per_expert, HAS_BIAS: tl.constexpr,
                       IEEE: tl.constexpr, DOT_F32: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, PACKED: tl.constexpr, SEARCH: tl.constexpr):
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:  # this expert has rows in this tile: only then are its codes read
        e64 = e.to(tl.int64)
        rm, rn, xmask, nmask = rows_and_cols(r0, hi, N, BM, BN)
        rk = tl.arange(0, BK)
        c_rows = c_ptr + e64 * N * (K // D) + rn[:, None].to(tl.int64) * (K // D)
        books = book_ptr + (e64 * books_per_expert + (rn // rows_per_book))[:, None] * book_stride
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            w = gather_tile(c_rows, books, kk, nmask[:, None] & kmask[None, :], D)
            x = tl.load(x_rows + kk[None, :], mask=xmask & kmask[None, :], other=0.0)
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


def plan(rows, experts, n, k, fp32=False, packed=None):
    return Plan(rows, experts, n, k, fp32=fp32, packed=packed)


def grouped_vq_linear(x, expert_offsets, codes, codebooks, bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    experts, n = codes.shape[0], codes.shape[1]
    _, nl, c, d = codebooks.shape
    k = codes.shape[2] * d
    p = plan(x.shape[0], experts, n, k, x.dtype == torch.float32, packed)
    return launch(_grouped_vq_kernel, p, x, expert_offsets, (codes, codebooks), bias, n, k, (n // nl, c * d, nl), D=d)
