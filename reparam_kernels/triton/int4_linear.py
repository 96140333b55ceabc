"""Triton W4A16 linear with group-wise scales and zero points.

Each program dequantizes a [BN, BK] weight tile in registers: the packed byte of
(n, k) is qweight[n, k // 2] and its nibble is the low one for even k, so every
byte is read for two adjacent k (the second read hits the cache). BK divides the
group size (the op requires group_size % 32 == 0), so a k-step lies in one group
and loads one scale and zero per row. Dequantized as (q - z) * s in fp32, rounded
to x's dtype, then tl.dot with fp32 accumulation.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_m, dot_nt, rows_and_output


@triton.jit
def _int4_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, K, G, group_size,
                        stride_xm, stride_ym,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        byte = tl.load(q_ptr + rn[:, None] * (K // 2) + (kk // 2)[None, :],
                       mask=nmask[:, None] & (kk[None, :] < K), other=0).to(tl.int32)
        nib = (byte >> ((kk % 2) * 4)[None, :]) & 0xF
        g = k0 // group_size
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        w = ((nib.to(tl.float32) - z[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
        acc = dot_nt(acc, x, w, IEEE, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & nmask[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def int4_linear(x, qweight, scales, zeros, group_size, bias=None):
    k = x.shape[-1]
    n = qweight.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    BM = block_m(m)
    BN, BK = 64, 32  # BK = 32 divides every allowed group size
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
    _int4_linear_kernel[grid](x2, qweight, scales, zeros, bias if bias is not None else y, y, m, n, k,
                              scales.shape[1], group_size, x2.stride(0), y.stride(0),
                              HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
                              BM=BM, BN=BN, BK=BK)
    return y.reshape(*x.shape[:-1], n)
