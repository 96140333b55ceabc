"""grouped_lut_linear: a mixture-of-experts layer's 4-bit lookup-table experts (log or k-means 4-bit) in one call,
with no host sync.

codes uint8 [E, N, K/2] (two 4-bit codes a byte, low nibble = even k), lut [E, L, 16], bias [E, N]: each expert's
layout as lut_linear's; x, expert_offsets and the rows no expert takes as every grouped op's (ops/_grouped.py).
Autograd: gradient for x and bias; the tables train through the per-expert path.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from ..reference.lut_linear import dequantize_lut
from ._grouped import backward_x_and_bias, check_rows_offsets_bias

OP = "grouped_lut_linear"


def check_grouped_lut_linear(x, expert_offsets, codes, lut, bias):
    check_tensor(OP, "codes", codes, ndim=3, dtype=torch.uint8, device=x.device)
    check_tensor(OP, "lut", lut, ndim=3, dtype=x.dtype, device=x.device)
    e, n, k = codes.shape[0], codes.shape[1], 2 * codes.shape[2]
    check(lut.shape[0] == e and lut.shape[2] == 16, OP,
          lambda: f"`lut` must be [E, L, 16] with E = {e} experts, got {tuple(lut.shape)}")
    check(lut.shape[1] > 0 and n % lut.shape[1] == 0, OP,
          lambda: f"`lut` has {lut.shape[1]} tables an expert, which must divide out_features N = {n}")
    check_rows_offsets_bias(OP, x, expert_offsets, e, k, n, bias)


def grouped_lut_linear(x, expert_offsets, codes, lut, bias=None):
    """y [T, N]: x's rows through their experts' lookup-table weights (see the module doc)."""
    x, lut, bias = _dispatch.autocast(x, lut, bias)
    check_grouped_lut_linear(x, expert_offsets, codes, lut, bias)
    return _dispatch.call(OP, x, expert_offsets, codes, lut, bias)


@torch.library.register_fake("reparam::grouped_lut_linear")
def _fake(x, expert_offsets, codes, lut, bias):
    check_grouped_lut_linear(x, expert_offsets, codes, lut, bias)
    return x.new_empty((x.shape[0], codes.shape[1]))


def _setup(ctx, inputs, output):
    x, expert_offsets, codes, lut, bias = inputs
    ctx.save_for_backward(expert_offsets, codes, lut)
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    offsets, codes, lut = ctx.saved_tensors
    gx, gb = backward_x_and_bias(OP, ctx, gy, offsets, codes.shape[0], 2 * codes.shape[2],
                                 lambda e, dt: dequantize_lut(codes[e], lut[e], dt), ctx.needs_input_grad[3])
    return gx, None, None, None, gb


torch.library.register_autograd("reparam::grouped_lut_linear", _backward, setup_context=_setup)


def fast_layout(x, expert_offsets, codes, lut, bias):
    """Whether the CUDA kernel's small-M loop takes the rows (whole 16-byte vectors: csrc/grouped_lut_linear.cu)."""
    return codes.shape[2] % 16 == 0


_dispatch.register(OpSpec(OP, reference.grouped_lut_linear, triton=_triton.grouped_lut_linear,
                          fast_layout=fast_layout))
