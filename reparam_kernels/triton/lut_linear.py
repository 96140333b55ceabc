"""Triton lookup-table linear: 4-bit codes (two per byte, low nibble = even k) decoded
through the 16-entry table of each row's group, W[n, k] = lut[n // rows_per_table, code],
then tl.dot with fp32 accumulation. The table gather reads 16 values per row group,
which stay in L1 across the K loop."""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_m, dot_nt, rows_and_output


@triton.jit
def _lut_linear_kernel(x_ptr, c_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, rows_per_table,
                       stride_xm, stride_ym,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nmask = rn < N
    table_row = (rn // rows_per_table) * 16
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        kmask = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        byte = tl.load(c_ptr + rn[:, None] * (K // 2) + (kk // 2)[None, :],
                       mask=nmask[:, None] & kmask[None, :], other=0).to(tl.int32)
        code = (byte >> ((kk % 2) * 4)[None, :]) & 0xF
        w = tl.load(lut_ptr + table_row[:, None] + code, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = dot_nt(acc, x, w, IEEE, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & nmask[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def lut_linear(x, codes, lut, bias=None):
    k = x.shape[-1]
    n = codes.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    BM = block_m(m)
    BN, BK = 64, 64
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
    _lut_linear_kernel[grid](x2, codes, lut, bias if bias is not None else y, y, m, n, k,
                             n // lut.shape[0], x2.stride(0), y.stride(0),
                             HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
                             BM=BM, BN=BN, BK=BK)
    return y.reshape(*x.shape[:-1], n)
