"""Triton grouped W4A16: every expert of a mixture-of-experts layer in one launch (ops/grouped_int4_linear.py).

Rows, experts and the two maps of programs to row tiles: ``_grouped.py``. The K loop is int4_linear's
tensor-core path (packed bytes → low and high nibbles → q·s − z·s interleaved into a [BN, BK] tile in x's
dtype, tl.dot). Not tuned on a GPU yet: no GEMV form for one row an expert, no split of K.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_nt, nibbles_f32, store_tile
from ._grouped import Plan, expert_and_first_row, launch, rows_and_cols


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
            lo4, hi4 = nibbles_f32(p)
            w = tl.interleave((lo4 * s - zs).to(x_ptr.dtype.element_ty), (hi4 * s - zs).to(x_ptr.dtype.element_ty))
            x = tl.load(x_rows + (k0 + tl.arange(0, BK))[None, :], mask=xmask, other=0.0)
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


def plan(rows, experts, n, k, group_size, fp32=False, packed=None):
    """K steps: the largest power of two dividing the group size, as int4_linear's."""
    return Plan(rows, experts, n, k, bk_limit=group_size & -group_size, fp32=fp32, packed=packed)


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    experts, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    p = plan(x.shape[0], experts, n, k, group_size, x.dtype == torch.float32, packed)
    return launch(_grouped_int4_kernel, p, x, expert_offsets, (qweight, scales, zeros), bias, n, k,
                  (k // group_size,), GROUP=group_size)
