"""grouped_vq_linear: a mixture-of-experts layer's vector-quantized experts (GPTVQ) in one call, with no host sync.

codes uint8 [E, N, K/d], codebooks [E, L, C ≤ 256, d], bias [E, N]: each expert's layout as vq_linear's; x,
expert_offsets and the rows no expert takes as every grouped op's (ops/_grouped.py).
Autograd: gradient for x and bias; the codebooks train through the per-expert path.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from ..reference.vq_linear import dequantize_vq
from ._grouped import backward_x_and_bias, check_rows_offsets_bias

OP = "grouped_vq_linear"


def check_grouped_vq_linear(x, expert_offsets, codes, codebooks, bias):
    check_tensor(OP, "codes", codes, ndim=3, dtype=torch.uint8, device=x.device)
    check_tensor(OP, "codebooks", codebooks, ndim=4, dtype=x.dtype, device=x.device)
    e, nl, c, d = codebooks.shape
    check(1 <= d <= 8 and 1 <= c <= 256, OP,
          lambda: f"`codebooks` must be [E, L, C, d] with C <= 256 entries (uint8 codes) and d in 1..8, "
                  f"got {tuple(codebooks.shape)}")
    check(codes.shape[0] == e, OP, lambda: f"`codes` holds {codes.shape[0]} experts, `codebooks` {e}")
    n, k = codes.shape[1], d * codes.shape[2]
    check(nl > 0 and n % nl == 0, OP, lambda: f"`codebooks` has {nl} codebooks an expert, which must divide "
                                              f"out_features N = {n}")
    check_rows_offsets_bias(OP, x, expert_offsets, e, k, n, bias)


def grouped_vq_linear(x, expert_offsets, codes, codebooks, bias=None):
    """y [T, N]: x's rows through their experts' vector-quantized weights (see the module doc)."""
    x, codebooks, bias = _dispatch.autocast(x, codebooks, bias)
    check_grouped_vq_linear(x, expert_offsets, codes, codebooks, bias)
    return _dispatch.call(OP, x, expert_offsets, codes, codebooks, bias)


@torch.library.register_fake("reparam::grouped_vq_linear")
def _fake(x, expert_offsets, codes, codebooks, bias):
    check_grouped_vq_linear(x, expert_offsets, codes, codebooks, bias)
    return x.new_empty((x.shape[0], codes.shape[1]))


def _setup(ctx, inputs, output):
    x, expert_offsets, codes, codebooks, bias = inputs
    ctx.save_for_backward(expert_offsets, codes, codebooks)
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    offsets, codes, codebooks = ctx.saved_tensors
    gx, gb = backward_x_and_bias(OP, ctx, gy, offsets, codes.shape[0], codes.shape[2] * codebooks.shape[3],
                                 lambda e, dt: dequantize_vq(codes[e], codebooks[e], dt), ctx.needs_input_grad[3])
    return gx, None, None, None, gb


torch.library.register_autograd("reparam::grouped_vq_linear", _backward, setup_context=_setup)


def fast_layout(x, expert_offsets, codes, codebooks, bias):
    """Whether the CUDA kernel's small-M loop takes the layout (csrc/grouped_vq_linear.cu): pairs, code rows of
    whole 16-byte vectors, and a column block of the loop (64 or 128 rows) reading at most two codebooks
    (vq_format.cuh's books_fit_slots)."""
    books, d = codebooks.shape[1], codebooks.shape[3]
    rows = codes.shape[1] // books

    def fits(block):
        return rows >= block or (block % rows == 0 and block // rows <= 2)
    return d == 2 and codes.shape[2] % 16 == 0 and (books <= 2 or (fits(64) and fits(128)))


_dispatch.register(OpSpec(OP, reference.grouped_vq_linear, triton=_triton.grouped_vq_linear,
                          fast_layout=fast_layout))
