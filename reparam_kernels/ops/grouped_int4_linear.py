"""grouped_int4_linear: a mixture-of-experts layer's int4 experts in one call, with no host sync.

qweight [E, N, K/2], scales and zeros [E, N, K // group_size], bias [E, N]: each expert's layout as
int4_linear's; x, expert_offsets and the rows no expert takes as every grouped op's (ops/_grouped.py).
Autograd: gradient for x and bias; the experts' scales and zeros train through the per-expert path.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from ..reference.int4_linear import dequantize_int4
from ._grouped import backward_x_and_bias, check_rows_offsets_bias

OP = "grouped_int4_linear"


def check_grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias):
    check_tensor(OP, "qweight", qweight, ndim=3, dtype=torch.uint8, device=x.device)
    e, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    check_rows_offsets_bias(OP, x, expert_offsets, e, k, n, bias)
    check(isinstance(group_size, int) and group_size > 0 and group_size % 32 == 0, OP,
          lambda: f"`group_size` must be a positive multiple of 32, got {group_size!r}")
    check(k % group_size == 0, OP, lambda: f"`group_size` = {group_size} does not divide in_features K = {k}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_tensor(OP, name, t, ndim=3, dtype=x.dtype, device=x.device)
        check(t.shape == (e, n, k // group_size), OP,
              lambda: f"`{name}` must be [E, N, K // group_size] = [{e}, {n}, {k // group_size}], got {tuple(t.shape)}")


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None):
    """y [T, N]: x's rows through their experts' int4 weights (see the module doc)."""
    x, scales, zeros, bias = _dispatch.autocast(x, scales, zeros, bias)
    check_grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias)
    return _dispatch.call(OP, x, expert_offsets, qweight, scales, zeros, group_size, bias)


@torch.library.register_fake("reparam::grouped_int4_linear")
def _fake(x, expert_offsets, qweight, scales, zeros, group_size, bias):
    check_grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _setup(ctx, inputs, output):
    x, expert_offsets, qweight, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(expert_offsets, qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    offsets, qweight, scales, zeros = ctx.saved_tensors
    gx, gb = backward_x_and_bias(
        OP, ctx, gy, offsets, qweight.shape[0], 2 * qweight.shape[2],
        lambda e, dt: dequantize_int4(qweight[e], scales[e], zeros[e], ctx.group_size, dt),
        ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    return gx, None, None, None, None, None, gb


torch.library.register_autograd("reparam::grouped_int4_linear", _backward, setup_context=_setup)


def fast_layout(x, expert_offsets, qweight, scales, zeros, group_size, bias):
    """Whether the CUDA kernel's small-M loop takes the groups (a power of two: csrc/grouped_int4_linear.cu)."""
    return group_size & (group_size - 1) == 0


_dispatch.register(OpSpec(OP, reference.grouped_int4_linear, triton=_triton.grouped_int4_linear,
                          fast_layout=fast_layout))
