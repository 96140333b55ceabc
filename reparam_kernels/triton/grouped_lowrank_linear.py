"""Triton grouped low-rank experts: two grouped launches, x·vᵀ then (x·vᵀ)·uᵀ (ops/grouped_lowrank_linear.py).

One kernel serves both steps: each is a grouped NT GEMM whose inner length and weight rows belong to the expert —
step 1 the columns are the expert's r_e rank directions over K (with perm: over the k_e = |v[e]| / r_e columns of
x after the first K − k_e in the expert's perm order, gathered, then those first K − k_e columns added as the
identity's product — K − k_e = r_e for a pivoted expert, 0 for a plain one), step 2 the inner length is r_e. The intermediate [T, max_rank] is fp32, cast to the factors' dtype before step 2's dot as the CUDA low-rank
kernels round it. Rows, experts and the two maps of programs to row tiles: ``_grouped.py``, each step with its own
plan (its own N and K). The weight rows' lengths and starts are runtime values (each expert's rank), so only the
layout's ``row_align`` promise (a constexpr ALIGN: tl.multiple_of on them) lets the compiler load 16 bytes at a
time; with ALIGN = 1 the loads are scalar. Not tuned on a GPU yet: no GEMV form for one row an expert, no split of
K, and a pivoted expert's x columns are gathered one by one (x is small at decode).
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_nt, store_tile
from ._grouped import Plan, expert_and_first_row, rows_and_cols


@triton.jit
def _grouped_lowrank_kernel(a_ptr, off_ptr, ends_ptr, b_ptr, fo_ptr, perm_ptr, bias_ptr, y_ptr, T, N, K, E,
                            tiles_m, stride_am, stride_ym, b_numel, R, ALIGN: tl.constexpr, SECOND: tl.constexpr,
                            PIVOTED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                            DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            PACKED: tl.constexpr, SEARCH: tl.constexpr):
    e, r0, hi = expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:
        e64 = e.to(tl.int64)
        r_lo = tl.load(fo_ptr + e64)
        rank = tl.minimum(tl.maximum(tl.load(fo_ptr + e64 + 1) - r_lo, 0), R)  # clamped: never past max_rank
        if SECOND:  # y = h[:, :r] · u[e]ᵀ: N columns, inner length r, u[e] at N·r_lo
            n_e = N
            k_e = rank
            base = N * r_lo
        else:  # h = x · v[e]ᵀ: r columns, inner length K (with perm: the segment's row length, K − r if pivoted)
            n_e = rank
            base = tl.load(fo_ptr + E + 1 + e64)
            if PIVOTED:
                k_e = tl.minimum(tl.maximum((tl.load(fo_ptr + E + 2 + e64) - base) // tl.maximum(rank, 1), 0), K)
            else:
                k_e = K
        p_e = K - k_e  # identity columns (with perm): r for a pivoted expert, 0 for a plain one
        if ALIGN > 1:  # the layout's promise: every row of every expert's factor starts ALIGN-element aligned
            base = tl.multiple_of(base, ALIGN)
            k_e = tl.multiple_of(k_e, ALIGN)
        # an expert whose factor would reach outside the tensor (a bad layout) is skipped as a whole: one scalar
        # test here rather than a bound in every load's mask, which would keep the loads from being vectorized
        n_e = tl.where((base >= 0) & (base + n_e.to(tl.int64) * k_e <= b_numel), n_e, 0)
        rm, rn, amask, nmask = rows_and_cols(r0, hi, n_e, BM, BN)
        rk = tl.arange(0, BK)
        a_rows = a_ptr + rm[:, None] * stride_am
        b_idx = base + rn[:, None].to(tl.int64) * k_e
        perm_e = perm_ptr + e64 * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, k_e, BK):
            kk = k0 + rk
            kmask = kk < k_e
            if PIVOTED and not SECOND:  # the non-pivot columns of x, in the expert's order (clamped to [0, K))
                cols = tl.load(perm_e + p_e + kk, mask=kmask, other=0)
                cols = tl.minimum(tl.maximum(cols, 0), K - 1)
            else:
                cols = kk
            a = tl.load(a_rows + cols[None, :], mask=amask & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + b_idx + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = dot_nt(acc, a.to(b_ptr.dtype.element_ty), b, IEEE, DOT_F32)
        if PIVOTED and not SECOND:  # + x's pivot columns (the identity block of [I | w]), exact in fp32
            imask = nmask & (rn < p_e)
            pcols = tl.minimum(tl.maximum(tl.load(perm_e + rn, mask=imask, other=0), 0), K - 1)
            acc += tl.load(a_rows + pcols[None, :], mask=amask & imask[None, :], other=0.0).to(tl.float32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, amask, nmask, stride_ym, 0, HAS_BIAS and SECOND)


def plans(rows, experts, n, k, max_rank, fp32=False, packed=None):
    """The two steps' launch plans: (x·vᵀ: max_rank columns over K, then ·uᵀ: N columns over max_rank)."""
    return (Plan(rows, experts, max_rank, k, fp32=fp32, packed=packed),
            Plan(rows, experts, n, max_rank, fp32=fp32, packed=packed))


def _step(plan, second, a, expert_offsets, b, factor_offsets, perm, bias, y, n, k, max_rank, row_align, ieee):
    plan_args = plan.constexprs()
    _grouped_lowrank_kernel[plan.grid()](
        a, expert_offsets, plan.ends(expert_offsets), b, factor_offsets, factor_offsets if perm is None else perm,
        y if bias is None else bias, y, a.shape[0], n, k, factor_offsets.shape[1] - 1, plan.tiles_m, a.stride(0),
        y.stride(0), b.numel(), max_rank, ALIGN=row_align, SECOND=second, PIVOTED=perm is not None and not second,
        HAS_BIAS=bias is not None, IEEE=ieee, DOT_F32=INTERPRET, **plan_args)


def grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align=1,
                           bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    rows, k = x.shape
    experts = factor_offsets.shape[1] - 1
    fp32 = x.dtype == torch.float32
    first, second = plans(rows, experts, out_features, k, max_rank, fp32, packed)
    y = torch.zeros((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    x, u, v = x.contiguous(), u.contiguous(), v.contiguous()
    fo = factor_offsets.contiguous()
    perm = None if perm is None else perm.contiguous()
    h = torch.empty((rows, max_rank), dtype=torch.float32, device=x.device)
    _step(first, False, x, expert_offsets, v, fo, perm, None, h, max_rank, k, max_rank, row_align, fp32)
    _step(second, True, h, expert_offsets, u, fo, None, None if bias is None else bias.contiguous(), y,
          out_features, max_rank, max_rank, row_align, fp32)
    return y
