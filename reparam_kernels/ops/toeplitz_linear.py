"""toeplitz_linear: y = T x + bias for a Toeplitz T [N, K] (T[r, s] = t[r − s + K − 1]).

Computed through the L×L circulant embedding of T (L = fft_size ≥ N + K − 1,
compress/structured.toeplitz_fft_size: the next power of two, 2n for a square
power-of-two n): ``t_spectrum`` [1, 1, 2, L//2 + 1] holds the rfft of the
embedding's first column (compress/structured.toeplitz_spectrum), in the
block_circulant_linear layout. Same math, backward and backends as a
block-circulant product with one L×L block; the parameter count is L + 2
reals for N + K − 1 free diagonals.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._dispatch import OpSpec
from .block_circulant_linear import _route, check_block_circulant, spectrum_grad, transposed_spectrum


def toeplitz_linear(x, t_spectrum, fft_size, out_features, bias=None):
    """y = T x + bias; x is [..., K]."""
    x, bias = _dispatch.autocast(x, bias)  # the spectrum stays fp32
    check_block_circulant("toeplitz_linear", x, t_spectrum, fft_size, out_features, bias, size_name="fft_size")
    return _route("toeplitz_linear", (x, t_spectrum, fft_size, out_features, bias), fft_size)


@torch.library.register_fake("reparam::toeplitz_linear")
def _fake(x, t_spectrum, fft_size, out_features, bias):
    check_block_circulant("toeplitz_linear", x, t_spectrum, fft_size, out_features, bias, size_name="fft_size")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx, inputs, output):
    x, t_spectrum, fft_size, out_features, bias = inputs
    ctx.save_for_backward(x, t_spectrum)
    ctx.fft_size = fft_size
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    x, t = ctx.saved_tensors
    gx = gt = gb = None
    if ctx.needs_input_grad[0]:
        gx = toeplitz_linear(gy.contiguous(), transposed_spectrum(t), ctx.fft_size, x.shape[-1], None)
    if ctx.needs_input_grad[1]:
        gt = spectrum_grad(x, gy, ctx.fft_size, 1, 1, t.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, gt, None, None, gb


torch.library.register_autograd("reparam::toeplitz_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec("toeplitz_linear", reference.toeplitz_linear,
                          triton=_triton.toeplitz_linear,
                          cuda_dtypes=(torch.float16, torch.bfloat16, torch.float32)))
