"""Triton W8A16 linear: int8 weight tiles converted to x's dtype in registers, tl.dot with
fp32 accumulation, the per-channel scale applied once to the accumulator (it is constant
along K), then the bias."""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_m, dot_nt, rows_and_output


@triton.jit
def _int8_linear_kernel(x_ptr, q_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = tl.load(q_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
        if DOT_F32:  # the interpreter converts int8 -> bf16 wrongly; int8 -> fp32 is exact
            acc = dot_nt(acc, x, q, IEEE, DOT_F32)
        else:  # exact: |q| <= 128 fits fp16/bf16 mantissas
            acc = dot_nt(acc, x, q.to(x_ptr.dtype.element_ty), IEEE, DOT_F32)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def int8_linear(x, qweight, scales, bias=None):
    k = x.shape[-1]
    n = qweight.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    BM = block_m(m)
    BN, BK = 64, 64
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
    _int8_linear_kernel[grid](x2, qweight, scales, bias if bias is not None else y, y, m, n, k,
                              x2.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                              IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET, BM=BM, BN=BN, BK=BK)
    return y.reshape(*x.shape[:-1], n)
