"""int4_linear (W4A16, group-wise): y = x @ W.T + bias,
W[n, k] = (q[n, k] − zeros[n, k // group_size]) · scales[n, k // group_size].

Layout: qweight uint8 [N, K/2], two unsigned 4-bit codes per byte along K,
low nibble = even k (``compress.quantize.pack_int4``); scales and zeros
[N, K // group_size] in x's dtype (zeros hold the zero point as a number, 8 for
symmetric codes). Requirements, checked here: group_size % 32 == 0 and
K % group_size == 0 (a 16-byte load of a row = 32 codes lies in one group).
Autograd: gradient for x (and bias) only.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec
from .._dtypes import acc_dtype
from ..reference.int4_linear import dequantize_int4

OP = "int4_linear"


def check_int4_linear(x, qweight, scales, zeros, group_size, bias):
    check_tensor(OP, "qweight", qweight, ndim=2, dtype=torch.uint8, device=x.device)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    check_x(OP, x, k)
    check(isinstance(group_size, int) and group_size > 0 and group_size % 32 == 0, OP,
          lambda: f"`group_size` must be a positive multiple of 32, got {group_size!r}")
    check(k % group_size == 0, OP, lambda: f"`group_size` = {group_size} does not divide in_features K = {k}")
    g = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_tensor(OP, name, t, ndim=2, dtype=x.dtype, device=x.device)
        check(t.shape == (n, g), OP,
              lambda: f"`{name}` must be [N, K // group_size] = [{n}, {g}], got {tuple(t.shape)}")
    check_bias(OP, bias, n, x)


def int4_linear(x, qweight, scales, zeros, group_size, bias=None):
    """y = x @ W.T + bias for the group-wise int4 weight above; x is [..., K]."""
    x, scales, zeros, bias = _dispatch.autocast(x, scales, zeros, bias)
    check_int4_linear(x, qweight, scales, zeros, group_size, bias)
    return _dispatch.call(OP, x, qweight, scales, zeros, group_size, bias)


@torch.library.register_fake("reparam::int4_linear")
def _fake(x, qweight, scales, zeros, group_size, bias):
    check_int4_linear(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(x, qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    x, qweight, scales, zeros = ctx.saved_tensors
    gx = gs = gz = gb = None
    if ctx.needs_input_grad[0]:
        gx = gy @ dequantize_int4(qweight, scales, zeros, ctx.group_size, gy.dtype)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        # W[n, k] = (q − z[n, g])·s[n, g]: the codes stay fixed, the grid (scale, zero) learns (distillation)
        n, k = qweight.shape[0], x.shape[-1]
        acc = acc_dtype(x.dtype)
        gw = (gy.reshape(-1, n).to(acc).t() @ x.reshape(-1, k).to(acc)).view(n, k // ctx.group_size, ctx.group_size)
        q = dequantize_int4(qweight, torch.ones_like(scales), torch.zeros_like(zeros), ctx.group_size, acc)
        q = q.view_as(gw)
        if ctx.needs_input_grad[2]:
            gs = (gw * (q - zeros.to(acc)[..., None])).sum(-1).to(scales.dtype)
        if ctx.needs_input_grad[3]:
            gz = (-gw.sum(-1) * scales.to(acc)).to(zeros.dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, None, gs, gz, None, gb


torch.library.register_autograd("reparam::int4_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.int4_linear, triton=_triton.int4_linear))
