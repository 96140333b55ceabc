"""lowrank_linear: y = x @ v.T @ u.T + bias, u [N, r], v [r, K].

Layout: both factors are row-major with the reduction dim contiguous
(v rows run along K, u rows along r), so every kernel reads 16-byte
vectors along the reduction for both products.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec


def _check_lowrank(x, u, v, bias):
    op = "lowrank_linear"
    check_tensor(op, "u", u, ndim=2, dtype=x.dtype, device=x.device)
    check_tensor(op, "v", v, ndim=2, dtype=x.dtype, device=x.device)
    check(u.shape[1] >= 1 and v.shape[1] >= 1, op, lambda: f"rank and in_features must be >= 1, got `u` {tuple(u.shape)}, `v` {tuple(v.shape)}")
    check(u.shape[1] == v.shape[0], op, lambda: f"rank mismatch: `u` is {tuple(u.shape)} = [N, r] and `v` is {tuple(v.shape)} = [r, K]")
    check_x(op, x, v.shape[1])
    check_bias(op, bias, u.shape[0], x)


def lowrank_linear(x, u, v, bias=None):
    """y = x @ v.T @ u.T + bias for a weight W ≈ u @ v (u [N, r], v [r, K]); x is [..., K]."""
    x, u, v, bias = _dispatch.autocast(x, u, v, bias)
    _check_lowrank(x, u, v, bias)
    return _dispatch.call("lowrank_linear", x, u, v, bias)


@torch.library.register_fake("reparam::lowrank_linear")
def _lowrank_fake(x, u, v, bias):
    _check_lowrank(x, u, v, bias)
    return x.new_empty((*x.shape[:-1], u.shape[0]))


def _lowrank_setup(ctx, inputs, output):
    x, u, v, bias = inputs
    ctx.save_for_backward(x, u, v)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, gy):
    x, u, v = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gy.reshape(-1, gy.shape[-1])
    gu_ = g2 @ u  # [M, r]
    gx = (gu_ @ v).reshape(x.shape) if ctx.needs_input_grad[0] else None
    gu = g2.t() @ (x2 @ v.t()) if ctx.needs_input_grad[1] else None
    gv = gu_.t() @ x2 if ctx.needs_input_grad[2] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, gu, gv, gb


torch.library.register_autograd("reparam::lowrank_linear", _lowrank_backward, setup_context=_lowrank_setup)
_dispatch.register(OpSpec("lowrank_linear", reference.lowrank_linear, triton=_triton.lowrank_linear))
