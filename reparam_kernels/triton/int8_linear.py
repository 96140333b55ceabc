"""Triton W8A16 linear: int8 weight tiles converted in registers, fp32 accumulation, the
per-channel scale applied once to the accumulator (it is constant along K), then the bias.
Same tiles as int4_linear (``_tiles``): a GEMV form at M = 1 (elementwise fp32 products,
reduced once), tl.dot above, split-K when the output tiles cannot fill the GPU. Any K."""
import torch
import triton
import triton.language as tl

from . import _tiles
from ._common import INTERPRET, acc_init, acc_result, acc_step, rows_and_output, split_k_tile, store_tile


@triton.jit
def _int8_linear_kernel(x_ptr, q_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, k_split, stride_xm, stride_ym,
                        stride_ys, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GEMV: tl.constexpr):
    rm, rn, xmask, nmask, k_lo, k_hi = split_k_tile(M, N, K, k_split, BM, BN)
    rk = tl.arange(0, BK)
    q_rows = q_ptr + rn[:, None].to(tl.int64) * K
    x_rows = x_ptr + rm[:, None] * stride_xm
    acc = acc_init(BM, BN, BK, GEMV)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        kmask = kk < K
        q = tl.load(q_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        x = tl.load(x_rows + kk[None, :], mask=xmask & kmask[None, :], other=0.0)
        # exact: |q| <= 128 fits fp16/bf16 mantissas (the interpreter converts int8 -> bf16 wrongly: fp32 there)
        acc = acc_step(acc, x, q if DOT_F32 else q.to(x_ptr.dtype.element_ty), IEEE, DOT_F32, GEMV)
    acc = acc_result(acc, GEMV)
    acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, bias_ptr, y_ptr, rm, rn, xmask, nmask, stride_ym, stride_ys, HAS_BIAS)


def int8_linear(x, qweight, scales, bias=None, split=None):
    """split: force the number of K splits (tests); None lets _tiles.choose decide."""
    k = x.shape[-1]
    n = qweight.shape[0]
    x2, y = rows_and_output(x, n)
    m = x2.shape[0]
    t = _tiles.choose(m, n, k, x.device, split=split, fp32=x.dtype == torch.float32, gemv_bk=64)
    out = _tiles.output(t, y)
    bias_ptr, has_bias = _tiles.kernel_bias(t, bias, y)
    _int8_linear_kernel[_tiles.grid(t, m, n)](
        x2, qweight, scales, bias_ptr, out, m, n, k, t.k_split, x2.stride(0), n, m * n,
        HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
        BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv, num_warps=t.warps, num_stages=t.stages)
    return _tiles.finish(t, out, y, bias).reshape(*x.shape[:-1], n)
