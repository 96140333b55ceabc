"""block_circulant_cols_linear: y = W x + bias for a block-circulant W given by its blocks' first columns.

Layout: ``w_cols`` is a real tensor [p, q, b], p = ceil(N/b), q = ceil(K/b): block (i, j) of W is
the circulant with first column ``w_cols[i, j]``, W[i b + n, j b + m] = w_cols[i, j, (n − m) mod b].
float32 whatever x's dtype (float64 allowed for float64 x). x is zero-padded to q·b features;
outputs beyond out_features are dropped.

The same product as ``block_circulant_linear`` (whose ``w_spectrum`` is the rfft of these columns), for
decode: its CUDA kernel (csrc/block_circulant_cols_linear.cu) runs the blocks as Toeplitz tiles on tensor
cores, every warp one memory round trip deep, where the FFT kernel is a chain of dependent transforms
(measured ~11.6 µs at M = 1 for 4096², b = 256). ``BlockCirculantLinear`` keeps these columns beside its
spectrum and calls this op at M ≤ 16 in eval mode (``ToeplitzLinear`` too, with its circulant embedding's
column as one block: out_features and K inside it). fp16 / bf16 on the GPU; fp32 and block sizes other
than powers of two in 64..65536 run the reference.

Backward (so the op is differentiable like the spectrum one):
  gx = Wᵀ gy: the same op with each block transposed (first column c'[m] = c[−m mod b]) and the block
  grid transposed; gc_ij[d] = Σ_rows Σ_n gy_i[n] x_j[(n − d) mod b] = irfft(Σ_rows rfft(gy_i)·conj(rfft(x_j))).
"""
import torch

from .. import _dispatch, reference
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from .block_circulant_linear import _route, check_block_grid
from .._dtypes import acc_dtype

OP = "block_circulant_cols_linear"
CUDA_BLOCK_SIZES = tuple(1 << e for e in range(6, 17))  # 64..65536: what the CUDA kernel takes


def check_block_circulant_cols(x, w_cols, out_features, bias):
    check(isinstance(out_features, int) and not isinstance(out_features, bool) and out_features >= 1, OP,
          lambda: f"`out_features` must be a positive int, got {out_features!r}")
    check_tensor(OP, "x", x, contiguous=False)
    allowed = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    check_tensor(OP, "w_cols", w_cols, ndim=3, dtype=allowed, device=x.device)
    p, q, b = w_cols.shape
    check(b >= 1, OP, lambda: f"`w_cols` has an empty block grid {tuple(w_cols.shape)}")
    check_block_grid(OP, "w_cols", w_cols.shape, p, q, b, x, out_features, bias)


def block_circulant_cols_linear(x, w_cols, out_features, bias=None):
    """y = W x + bias, W block-circulant [out_features, K] given by its blocks' first columns; x is [..., K]."""
    x, bias = _dispatch.autocast(x, bias)  # the columns stay fp32
    check_block_circulant_cols(x, w_cols, out_features, bias)
    return _route(OP, (x, w_cols, out_features, bias), w_cols.shape[-1], CUDA_BLOCK_SIZES)


@torch.library.register_fake("reparam::block_circulant_cols_linear")
def _fake(x, w_cols, out_features, bias):
    check_block_circulant_cols(x, w_cols, out_features, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def transposed_cols(w_cols):
    """Columns of Wᵀ [q, p, b]: the block grid transposed, each block's column c'[m] = c[−m mod b]."""
    return torch.roll(w_cols.flip(-1), 1, dims=-1).transpose(0, 1).contiguous()


def cols_grad(x, gy, p, q, b, dtype):
    """gc [p, q, b] of the loss w.r.t. the columns (see the module docstring)."""
    acc = acc_dtype(dtype)
    x2 = torch.nn.functional.pad(x.reshape(-1, x.shape[-1]).to(acc), (0, q * b - x.shape[-1]))
    g2 = torch.nn.functional.pad(gy.reshape(-1, gy.shape[-1]).to(acc), (0, p * b - gy.shape[-1]))
    xf = torch.fft.rfft(x2.reshape(-1, q, b), dim=-1)  # [M, q, h]
    gf = torch.fft.rfft(g2.reshape(-1, p, b), dim=-1)  # [M, p, h]
    return torch.fft.irfft(torch.einsum("mif,mjf->ijf", gf, xf.conj()), n=b, dim=-1).to(dtype)


def _setup(ctx, inputs, output):
    x, w_cols, out_features, bias = inputs
    ctx.save_for_backward(x, w_cols)
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    x, w = ctx.saved_tensors
    p, q, b = w.shape
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = block_circulant_cols_linear(gy.contiguous(), transposed_cols(w), x.shape[-1], None)
    if ctx.needs_input_grad[1]:
        gw = cols_grad(x, gy, p, q, b, w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, gw, None, gb


torch.library.register_autograd("reparam::block_circulant_cols_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.block_circulant_cols_linear))
