"""lut_linear: y = x @ W.T + bias with W[n, k] = lut[n // (N / L), code[n, k]].

Layout: codes uint8 [N, K/2], two 4-bit codes per byte along K, low nibble =
even k (``compress.quantize.pack_int4``); lut [L, 16] in x's dtype, one
16-entry decode table per group of N / L consecutive output rows (L = N: per
row, L = 1: per layer). Serves log quantization at 4 bits (per-row tables
``scale[n] · log_levels(4)``) and vector quantization with d = 1 and up to
16 centroids (the codebook of each row group is its table).
Autograd: gradients for x, the tables (the codes stay fixed: distillation tunes the tables) and bias.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec
from ..reference.int4_linear import unpack_nibbles
from ..reference.lut_linear import dequantize_lut
from .vq_linear import codebook_grad

OP = "lut_linear"


def check_lut_linear(x, codes, lut, bias):
    check_tensor(OP, "codes", codes, ndim=2, dtype=torch.uint8, device=x.device)
    n, k = codes.shape[0], 2 * codes.shape[1]
    check_x(OP, x, k)
    check_tensor(OP, "lut", lut, ndim=2, dtype=x.dtype, device=x.device)
    check(lut.shape[1] == 16, OP, lambda: f"`lut` must be [L, 16] (4-bit codes), got {tuple(lut.shape)}")
    check(lut.shape[0] > 0 and n % lut.shape[0] == 0, OP,
          lambda: f"`lut` has {lut.shape[0]} tables, which must divide out_features N = {n}")
    check_bias(OP, bias, n, x)


def lut_linear(x, codes, lut, bias=None):
    """y = x @ W.T + bias, W decoded from 4-bit codes through per-row-group tables; x is [..., K]."""
    x, lut, bias = _dispatch.autocast(x, lut, bias)
    check_lut_linear(x, codes, lut, bias)
    return _dispatch.call(OP, x, codes, lut, bias)


@torch.library.register_fake("reparam::lut_linear")
def _fake(x, codes, lut, bias):
    check_lut_linear(x, codes, lut, bias)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup(ctx, inputs, output):
    x, codes, lut, bias = inputs
    ctx.save_for_backward(codes, lut, x if lut.requires_grad else None)  # x only for the tables' gradient
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    codes, lut, x = ctx.saved_tensors
    gx = gl = gb = None
    if ctx.needs_input_grad[0]:
        gx = gy @ dequantize_lut(codes, lut, gy.dtype)
    if ctx.needs_input_grad[2]:  # vq_linear's codebook gradient with d = 1
        gl = codebook_grad(gy, x, unpack_nibbles(codes).long(), (*lut.shape, 1)).reshape(lut.shape).to(lut.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, None, gl, gb


torch.library.register_autograd("reparam::lut_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.lut_linear, triton=_triton.lut_linear))
