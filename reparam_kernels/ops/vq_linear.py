"""vq_linear: y = x @ W.T + bias with W[n, k] = codebooks[n // (N / L), codes[n, k // d], k % d].

Layout: codes uint8 [N, K/d], one code per sub-vector of d consecutive inputs (d = 1..8, up to 256
entries: 8 bits); codebooks [L, E, d] in x's dtype, one per group of N / L consecutive output rows.
Serves what ``lut_linear`` (4-bit codes, d = 1) cannot: VQ of pairs or longer sub-vectors (GPTVQ's
d = 2 with 256 entries is 4 bits a weight), up to 256 scalar entries (log 8-bit). Kernels: CUDA
(csrc/vq_linear.cu: pairs at M <= 64 on the register-fed tensor-core loop with the codebooks in shared
memory; any d on the general dequantizing path), Triton, and the reference.
Autograd: gradients for x, the codebooks (the codes stay fixed: distillation tunes the codebooks) and bias.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec
from .._dtypes import acc_dtype
from ..reference.vq_linear import dequantize_vq

OP = "vq_linear"


def check_vq_linear(x, codes, codebooks, bias):
    check_tensor(OP, "codes", codes, ndim=2, dtype=torch.uint8, device=x.device)
    check_tensor(OP, "codebooks", codebooks, ndim=3, dtype=x.dtype, device=x.device)
    nl, e, d = codebooks.shape
    check(1 <= d <= 8 and 1 <= e <= 256, OP,
          lambda: f"`codebooks` must be [L, E, d] with E <= 256 entries (uint8 codes) and d in 1..8, "
                  f"got {tuple(codebooks.shape)}")
    n, k = codes.shape[0], d * codes.shape[1]
    check_x(OP, x, k)
    check(nl > 0 and n % nl == 0, OP, lambda: f"`codebooks` has {nl} codebooks, which must divide out_features N = {n}")
    check_bias(OP, bias, n, x)


def vq_linear(x, codes, codebooks, bias=None):
    """y = x @ W.T + bias, W decoded from sub-vector codes through per-row-group codebooks; x is [..., K]."""
    x, codebooks, bias = _dispatch.autocast(x, codebooks, bias)
    check_vq_linear(x, codes, codebooks, bias)
    return _dispatch.call(OP, x, codes, codebooks, bias)


@torch.library.register_fake("reparam::vq_linear")
def _fake(x, codes, codebooks, bias):
    check_vq_linear(x, codes, codebooks, bias)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup(ctx, inputs, output):
    x, codes, codebooks, bias = inputs
    ctx.save_for_backward(codes, codebooks, x if codebooks.requires_grad else None)  # x only for the books' gradient
    ctx.has_bias = bias is not None


def codebook_grad(gy, x, codes, shape):
    """∂L/∂codebooks [L, E, d] (in x's accumulation dtype) of W[n, k] = codebooks[n // (N / L), codes[n, k // d],
    k % d] given y's gradient gy and the input x: the sum of ∂L/∂W[n, k] = (gyᵀ·x)[n, k] over the weights reading
    each entry. codes: int64 [N, K / d] (lut_linear's gradient too, as d = 1 with its nibbles unpacked)."""
    nl, ne, d = shape
    n, k = codes.shape[0], x.shape[-1]
    acc = acc_dtype(x.dtype)
    gw = gy.reshape(-1, n).to(acc).t() @ x.reshape(-1, k).to(acc)  # [N, K]
    book = torch.arange(n, device=gw.device)[:, None] // (n // nl)
    slot = (book * ne + codes).repeat_interleave(d, 1) * d + torch.arange(k, device=gw.device) % d
    g = torch.zeros(nl * ne * d, dtype=acc, device=gw.device)
    return g.index_add_(0, slot.reshape(-1), gw.reshape(-1)).reshape(shape)


def _backward(ctx, gy):
    codes, codebooks, x = ctx.saved_tensors
    gx = gc = gb = None
    if ctx.needs_input_grad[0]:
        gx = gy @ dequantize_vq(codes, codebooks, gy.dtype)
    if ctx.needs_input_grad[2]:
        gc = codebook_grad(gy, x, codes.long(), codebooks.shape).to(codebooks.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, None, gc, gb


torch.library.register_autograd("reparam::vq_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.vq_linear, triton=_triton.vq_linear))
