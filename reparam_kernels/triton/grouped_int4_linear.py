"""Triton grouped W4A16: every expert of a mixture-of-experts layer in one launch (ops/grouped_int4_linear.py).

Grid: (experts × row tiles of T, column tiles of N). A program reads its expert's row range from the
offsets on the device and computes nothing when its row tile starts past it — an expert no row was
routed to costs E·T/BM empty programs and none of its weight bytes, which is what makes decode (two
routed experts of many) cheap. The K loop is int4_linear's tensor-core path (packed bytes → low and high
nibbles → q·s − z·s interleaved into a [BN, BK] tile in x's dtype, tl.dot). Not tuned on a GPU yet:
no GEMV path for one row per expert, no split of K, and the row tiles are not packed per expert (a long
prefill launches E·T/BM programs, most of them empty).
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_nt, nibbles_f32, store_tile
from ._tiles import choose


@triton.jit
def _grouped_int4_kernel(x_ptr, off_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, T, N, K, G, tiles_m,
                         stride_xm, stride_ym, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr):
    pid = tl.program_id(0)
    e = pid // tiles_m
    lo = tl.minimum(tl.maximum(tl.load(off_ptr + e), 0), T)  # clamped: bad offsets never read out of bounds
    hi = tl.minimum(tl.maximum(tl.load(off_ptr + e + 1), lo), T)
    r0 = lo + (pid % tiles_m) * BM
    if r0 < hi:  # this expert has rows in this tile: only then are its weights read
        e64 = e.to(tl.int64)
        rm = r0 + tl.arange(0, BM).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        xmask, nmask = rm[:, None] < hi, rn < N
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


def tiles(rows, experts, n, k, group_size, fp32=False):
    """int4_linear's tiles (``_tiles.choose``) for the mean rows per expert, never its GEMV form (one row per
    expert takes tl.dot's 16-row tile) and never split along K."""
    per_expert = max(2, triton.cdiv(rows, max(experts, 1)))
    return choose(per_expert, n, k, torch.device("cpu"), bk_limit=group_size & -group_size, split=1, fp32=fp32)


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None):
    experts, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    rows = x.shape[0]
    y = torch.zeros((rows, n), dtype=x.dtype, device=x.device)  # rows no expert takes stay zero
    if rows == 0:
        return y
    t = tiles(rows, experts, n, k, group_size, fp32=x.dtype == torch.float32)
    tiles_m = triton.cdiv(rows, t.bm)
    x = x.contiguous()
    _grouped_int4_kernel[(experts * tiles_m, triton.cdiv(n, t.bn))](
        x, expert_offsets, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
        y if bias is None else bias.contiguous(), y, rows, n, k, k // group_size, tiles_m, x.stride(0), n,
        GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
        BM=t.bm, BN=t.bn, BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    return y
