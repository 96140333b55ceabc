"""Triton grouped 4-bit lookup-table linear: every expert of a mixture-of-experts layer in one launch
(ops/grouped_lut_linear.py; log and k-means 4-bit experts).

Rows, experts and the two maps of programs to row tiles: ``_grouped.py``. The K loop is lut_linear's tl.dot
path: the program's rows' tables of its expert loaded once, [BN, 16], before the loop; each [BN, BK/2] tile of
code bytes split into its two nibbles, decoded by tl.gather from those registers (lut_linear's decode_nibbles)
and interleaved to match x's [BM, BK] tile. Any even K. Not tuned on a GPU yet: no GEMV form for one row an expert, no split of K.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_nt, store_tile
from ._grouped import Plan, expert_and_first_row, launch, rows_and_cols
from .lut_linear import decode_nibbles


@triton.jit
def _grouped_lut_kernel(x_ptr, off_ptr, ends_ptr, c_ptr, lut_ptr, bias_ptr, y_ptr, T, N, K, E, tiles_m,
                        stride_xm, stride_ym, rows_per_table, tables_per_expert, HAS_BIAS: tl.constexpr,
                        IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, PACKED: tl.constexpr, SEARCH: tl.constexpr):
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:  # this expert has rows in this tile: only then are its codes read
        e64 = e.to(tl.int64)
        rm, rn, xmask, nmask = rows_and_cols(r0, hi, N, BM, BN)
        half = K // 2
        rh = tl.arange(0, BK // 2)
        tables = e64 * tables_per_expert + rn // rows_per_table
        table = tl.load(lut_ptr + tables[:, None] * 16 + tl.arange(0, 16)[None, :], mask=nmask[:, None],
                        other=0.0).to(tl.float32)
        c_rows = c_ptr + e64 * N * half + rn[:, None].to(tl.int64) * half
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kh = k0 // 2 + rh  # byte index: codes of k = 2·kh (low nibble) and 2·kh + 1
            p = tl.load(c_rows + kh[None, :], mask=nmask[:, None] & (kh < half)[None, :], other=0).to(tl.int32)
            w_lo, w_hi = decode_nibbles(table, p)
            kk = k0 + tl.arange(0, BK)
            x = tl.load(x_rows + kk[None, :], mask=xmask & (kk < K)[None, :], other=0.0)
            w = tl.interleave(w_lo.to(x_ptr.dtype.element_ty), w_hi.to(x_ptr.dtype.element_ty))
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


def plan(rows, experts, n, k, fp32=False, packed=None):
    return Plan(rows, experts, n, k, fp32=fp32, packed=packed)


def grouped_lut_linear(x, expert_offsets, codes, lut, bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    experts, n, k = codes.shape[0], codes.shape[1], 2 * codes.shape[2]
    p = plan(x.shape[0], experts, n, k, x.dtype == torch.float32, packed)
    tables = lut.shape[1]
    return launch(_grouped_lut_kernel, p, x, expert_offsets, (codes, lut), bias, n, k, (n // tables, tables))
