"""C = A @ B.T (+ bias) with both operands K-contiguous: the shared Triton GEMM.

Used by ops whose products are "NT" shaped (low-rank factors). fp32 accumulation; A is cast
to B's dtype before the product, so an fp32 intermediate feeding an fp16 weight is rounded
like the CUDA path. Tiles, the GEMV form at M = 1 and split-K as the quantized kernels
(``_tiles.choose``).
"""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, acc_init, acc_result, acc_step, split_k_tile, store_tile


@triton.jit
def _matmul_nt_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, k_split, stride_am, stride_bn, stride_cm,
                      stride_cs, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GEMV: tl.constexpr):
    rm, rn, amask, nmask, k_lo, k_hi = split_k_tile(M, N, K, k_split, BM, BN)
    rk = tl.arange(0, BK)
    a_rows = a_ptr + rm[:, None] * stride_am
    b_rows = b_ptr + rn[:, None].to(tl.int64) * stride_bn
    acc = acc_init(BM, BN, BK, GEMV)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(a_rows + kk[None, :], mask=amask & kmask[None, :], other=0.0).to(b_ptr.dtype.element_ty)
        b = tl.load(b_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = acc_step(acc, a, b, IEEE, DOT_F32, GEMV)
    acc = acc_result(acc, GEMV)
    store_tile(acc, bias_ptr, c_ptr, rm, rn, amask, nmask, stride_cm, stride_cs, HAS_BIAS)


def matmul_nt(a, b, bias=None, out_dtype=None, split=None):
    """a [M, K], b [N, K] (both contiguous) -> a @ b.T + bias, in out_dtype (default a's).
    split: force the number of K splits (tests); None lets _tiles.choose decide."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    t = _tiles.choose(M, N, K, a.device, split=split, fp32=b.dtype == torch.float32)
    out = _tiles.output(t, c)
    bias_ptr, has_bias = _tiles.kernel_bias(t, bias, c)
    _matmul_nt_kernel[_tiles.grid(t, M, N)](
        a, b, bias_ptr, out, M, N, K, t.k_split, a.stride(0), b.stride(0), N, M * N,
        HAS_BIAS=has_bias, IEEE=b.dtype == torch.float32, DOT_F32=INTERPRET,
        BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv, num_warps=t.warps, num_stages=t.stages)
    return _tiles.finish(t, out, c, bias)
