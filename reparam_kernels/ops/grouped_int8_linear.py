"""grouped_int8_linear: a mixture-of-experts layer's int8 experts in one call, with no host sync.

qweight int8 [E, N, K], scales [E, N], bias [E, N]: each expert's layout as int8_linear's; x, expert_offsets
and the rows no expert takes as every grouped op's (ops/_grouped.py).
Autograd: gradient for x and bias; the integer weights and their scales are frozen here.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from ._grouped import backward_x_and_bias, check_rows_offsets_bias

OP = "grouped_int8_linear"


def check_grouped_int8_linear(x, expert_offsets, qweight, scales, bias):
    check_tensor(OP, "qweight", qweight, ndim=3, dtype=torch.int8, device=x.device)
    e, n, k = qweight.shape
    check_rows_offsets_bias(OP, x, expert_offsets, e, k, n, bias)
    check_tensor(OP, "scales", scales, ndim=2, dtype=x.dtype, device=x.device)
    check(scales.shape == (e, n), OP, lambda: f"`scales` must be [E, N] = [{e}, {n}], got {tuple(scales.shape)}")


def grouped_int8_linear(x, expert_offsets, qweight, scales, bias=None):
    """y [T, N]: x's rows through their experts' int8 weights (see the module doc)."""
    x, scales, bias = _dispatch.autocast(x, scales, bias)
    check_grouped_int8_linear(x, expert_offsets, qweight, scales, bias)
    return _dispatch.call(OP, x, expert_offsets, qweight, scales, bias)


@torch.library.register_fake("reparam::grouped_int8_linear")
def _fake(x, expert_offsets, qweight, scales, bias):
    check_grouped_int8_linear(x, expert_offsets, qweight, scales, bias)
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _setup(ctx, inputs, output):
    x, expert_offsets, qweight, scales, bias = inputs
    ctx.save_for_backward(expert_offsets, qweight, scales)
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    offsets, qweight, scales = ctx.saved_tensors
    gx, gb = backward_x_and_bias(OP, ctx, gy, offsets, qweight.shape[0], qweight.shape[2],
                                 lambda e, dt: qweight[e].to(dt) * scales[e].to(dt)[:, None], ctx.needs_input_grad[3])
    return gx, None, None, None, gb


torch.library.register_autograd("reparam::grouped_int8_linear", _backward, setup_context=_setup)


def fast_layout(x, expert_offsets, qweight, scales, bias):
    """Whether the CUDA kernel's small-M loop takes the rows (whole 16-byte vectors: csrc/grouped_int8_linear.cu)."""
    return qweight.shape[2] % 16 == 0


_dispatch.register(OpSpec(OP, reference.grouped_int8_linear, triton=_triton.grouped_int8_linear,
                          fast_layout=fast_layout))
