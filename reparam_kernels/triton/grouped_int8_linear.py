"""Triton grouped W8A16: every expert of a mixture-of-experts layer in one launch (ops/grouped_int8_linear.py).

Rows, experts and the two maps of programs to row tiles: ``_grouped.py``. The K loop is int8_linear's
tensor-core path (int8 tiles converted to x's dtype, exact; tl.dot), the per-channel scale applied once to the
accumulator. Any K. Not tuned on a GPU yet: no GEMV form for one row an expert, no split of K.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_nt, store_tile
from ._grouped import Plan, expert_and_first_row, launch, rows_and_cols


@triton.jit
def _grouped_int8_kernel(x_ptr, off_ptr, ends_ptr, q_ptr, s_ptr, bias_ptr, y_ptr, T, N, K, E, tiles_m,
                         stride_xm, stride_ym, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PACKED: tl.constexpr,
                         SEARCH: tl.constexpr):
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:  # this expert has rows in this tile: only then are its weights read
        e64 = e.to(tl.int64)
        rm, rn, xmask, nmask = rows_and_cols(r0, hi, N, BM, BN)
        rk = tl.arange(0, BK)
        q_rows = q_ptr + e64 * N * K + rn[:, None].to(tl.int64) * K
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            q = tl.load(q_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            x = tl.load(x_rows + kk[None, :], mask=xmask & kmask[None, :], other=0.0)
            # exact: |q| <= 128 fits fp16/bf16 mantissas (the interpreter converts int8 -> bf16 wrongly: fp32 there)
            acc = dot_nt(acc, x, q if DOT_F32 else q.to(x_ptr.dtype.element_ty), IEEE, DOT_F32)
        acc = acc * tl.load(s_ptr + e64 * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


def plan(rows, experts, n, k, fp32=False, packed=None):
    return Plan(rows, experts, n, k, fp32=fp32, packed=packed)


def grouped_int8_linear(x, expert_offsets, qweight, scales, bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    experts, n, k = qweight.shape
    p = plan(x.shape[0], experts, n, k, x.dtype == torch.float32, packed)
    return launch(_grouped_int8_kernel, p, x, expert_offsets, (qweight, scales), bias, n, k)
