"""int8_linear (W8A16): y = (x @ qweight.T) * scales + bias.

Layout: qweight int8 [N, K] row-major (K contiguous: 16-byte loads hold 16
consecutive k of one output channel), symmetric codes from
``compress.quantize.quantize_linear(w, bits=8)``; scales [N] in x's dtype.
Autograd: gradient for x (and bias) only; the integer weight is frozen.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec

OP = "int8_linear"


def check_int8_linear(x, qweight, scales, bias):
    check_tensor(OP, "qweight", qweight, ndim=2, dtype=torch.int8, device=x.device)
    n, k = qweight.shape
    check_x(OP, x, k)
    check_tensor(OP, "scales", scales, ndim=1, dtype=x.dtype, device=x.device)
    check(scales.shape[0] == n, OP, lambda: f"`scales` has {scales.shape[0]} elements, expected out_features N = {n} (one per row of `qweight`)")
    check_bias(OP, bias, n, x)


def int8_linear(x, qweight, scales, bias=None):
    """y = (x @ qweight.T) * scales + bias; qweight int8 [N, K], scales [N]; x is [..., K]."""
    x, scales, bias = _dispatch.autocast(x, scales, bias)
    check_int8_linear(x, qweight, scales, bias)
    return _dispatch.call(OP, x, qweight, scales, bias)


@torch.library.register_fake("reparam::int8_linear")
def _fake(x, qweight, scales, bias):
    check_int8_linear(x, qweight, scales, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup(ctx, inputs, output):
    x, qweight, scales, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    qweight, scales = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = qweight.to(gy.dtype) * scales[:, None]
        gx = gy @ w
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, None, None, gb


torch.library.register_autograd("reparam::int8_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.int8_linear, triton=_triton.int8_linear))
