"""Triton pivoted low-rank linear, two launches like the plain low-rank Triton backend:

1. t[M, r] = x[:, perm[:r]] + x[:, perm[r:]] @ w.T, in fp32 — x's columns are gathered inside the
   kernel (perm is read once per K tile), so no permuted copy of x is made;
2. y = t @ u.T + bias — the shared NT GEMM (t rounded to u's dtype before the dot, as in lowrank_linear).

The CUDA backend (csrc/pivoted_lowrank_linear.cu) does it in one launch; this one serves fp32 and
machines without the extension.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_m, dot_nt, rows_and_output
from ._matmul_nt import matmul_nt


@triton.jit
def _pivot_t_kernel(x_ptr, w_ptr, perm_ptr, t_ptr, M, R, KR, stride_xm, stride_wr,
                    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                    BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, KR, BK):
        kk = k0 + rk
        cols = tl.load(perm_ptr + R + kk, mask=kk < KR, other=0)  # x columns of this tile of w's columns
        a = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=(rm[:, None] < M) & (kk[None, :] < KR),
                    other=0.0)
        b = tl.load(w_ptr + rr[:, None] * stride_wr + kk[None, :], mask=(rr[:, None] < R) & (kk[None, :] < KR),
                    other=0.0)
        acc = dot_nt(acc, a.to(b.dtype), b, IEEE, DOT_F32)
    piv = tl.load(perm_ptr + rr, mask=rr < R, other=0)  # the pivot columns: the identity block of v
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    acc += tl.load(x_ptr + rm[:, None] * stride_xm + piv[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(t_ptr + rm[:, None] * R + rr[None, :], acc, mask=mask)


def pivoted_lowrank_linear(x, u, w, perm, bias=None):
    r = u.shape[1]
    x2, t = rows_and_output(x, r, torch.float32)
    M, kr = x2.shape[0], w.shape[1]
    # rank = K leaves w empty (its pointer may be null on a GPU): pass x, which the loop never reads then
    w = w.contiguous() if kr > 0 else x2
    BM, BR, BK = block_m(M), 64, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(r, BR))
    _pivot_t_kernel[grid](x2, w, perm.contiguous(), t, M, r, kr, x2.stride(0), w.stride(0),
                          IEEE=w.dtype == torch.float32, DOT_F32=INTERPRET, BM=BM, BR=BR, BK=BK)
    y = matmul_nt(t, u.contiguous(), bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], u.shape[0])
