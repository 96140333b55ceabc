"""lowrank_linear: y = x @ v.T @ u.T + bias, u [N, r], v [r, K].

Layout: both factors are row-major with the reduction dim contiguous
(v rows run along K, u rows along r), so every kernel reads 16-byte
vectors along the reduction for both products.
"""
import torch
import torch.nn.functional as F

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec
from .._env import min_m, opt_in


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
    if x.device.type in EAGER_PRODUCTS_DEVICES and _two_products_route(x):
        return F.linear(F.linear(x, v), u, bias)
    return _dispatch.call("lowrank_linear", x, u, v, bias)


# Eager calls whose C++ route is two cuBLAS products (csrc/lowrank_large_m.cuh: plain factors at every M by
# default) make those two products from here: the same GEMMs (aten's linear, the bias in the second one's
# epilogue), without the custom op's dispatch and its two boxed aten calls — host time only, which eager
# decode pays on every layer (run 3, 8192², M = 16: 44.6 µs a call through the op against 17.3 µs for the
# two products from Python, the GPU busy 13 µs of it). Compiled graphs keep the op; a CUDA graph captured in
# eager mode records the same two GEMMs either way.
EAGER_PRODUCTS_DEVICES = ("cuda",)  # (a test widens it to run the shortcut on the CPU)


def _two_products_route(x):
    """Whether the C++ op would take its two-cuBLAS route for x: its kernel runs x (not a fallback), no
    REPARAM_LOWRANK_GEMV=1 launch is asked for, and M reaches REPARAM_LOWRANK_CUBLAS_MIN_M (as
    csrc/cublas_mm.cuh reads it: unset → 1, 0 or less → never), in eager mode."""
    if torch.compiler.is_compiling() or _dispatch.backend_of("lowrank_linear", x)[0] != "cuda":
        return False
    if opt_in("REPARAM_LOWRANK_GEMV"):
        return False
    m = min_m("REPARAM_LOWRANK_CUBLAS_MIN_M", 1)
    return m is not None and x.numel() // max(x.shape[-1], 1) >= m


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
