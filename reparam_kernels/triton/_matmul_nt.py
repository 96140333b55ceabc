"""C = A @ B.T (+ bias) with both operands K-contiguous: the shared Triton GEMM.

Used by ops whose products are "NT" shaped (low-rank factors, dequantized
tiles). fp32 accumulation; A is cast to B's dtype before the tensor-core dot,
so an fp32 intermediate feeding an fp16 weight is rounded like the CUDA path.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_m, dot_nt


@triton.jit
def _matmul_nt_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
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
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = dot_nt(acc, a.to(b.dtype), b, IEEE, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def matmul_nt(a, b, bias=None, out_dtype=None):
    """a [M, K], b [N, K] (both contiguous) -> a @ b.T + bias, in out_dtype (default a's)."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    BM = block_m(M)
    BN, BK = 64, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _matmul_nt_kernel[grid](a, b, bias if bias is not None else c, c, M, N, K,
                            a.stride(0), b.stride(0), c.stride(0),
                            HAS_BIAS=bias is not None, IEEE=b.dtype == torch.float32, DOT_F32=INTERPRET,
                            BM=BM, BN=BN, BK=BK)
    return c
