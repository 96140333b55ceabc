"""grouped_int4_linear: a mixture-of-experts layer's int4 experts in one call, with no host sync.

x [T, K] holds the routed rows sorted by expert; rows expert_offsets[e]:expert_offsets[e+1] go through
expert e's int4_linear (qweight [E, N, K/2], scales and zeros [E, N, K // group_size], bias [E, N]; each
expert's layout as int4_linear's); rows in no expert's range (after expert_offsets[E]: tokens routed
elsewhere, an expert-parallel sentinel) come out as zeros. Every shape is static and the offsets stay on
the device, so the call is capturable in a CUDA graph and one node under torch.compile
(``compress.experts.UnfusedExperts`` builds the sort and the offsets). Offsets outside [0, T] are
clamped by the kernel (no out-of-bounds access), not diagnosed: that would need a host sync.
Autograd: gradient for x and bias; the experts' scales and zeros train through the per-expert path.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor, check_x
from .._dispatch import OpSpec
from ..reference.int4_linear import dequantize_int4

OP = "grouped_int4_linear"


def check_grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias):
    check_tensor(OP, "qweight", qweight, ndim=3, dtype=torch.uint8, device=x.device)
    e, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    check_x(OP, x, k)
    check(x.dim() == 2, OP, lambda: f"`x` must be 2-D [rows, in_features], got shape {tuple(x.shape)}")
    check_tensor(OP, "expert_offsets", expert_offsets, ndim=1, dtype=torch.int64, device=x.device)
    check(expert_offsets.shape[0] == e + 1, OP,
          lambda: f"`expert_offsets` must have experts + 1 = {e + 1} entries, got {expert_offsets.shape[0]}")
    check(isinstance(group_size, int) and group_size > 0 and group_size % 32 == 0, OP,
          lambda: f"`group_size` must be a positive multiple of 32, got {group_size!r}")
    check(k % group_size == 0, OP, lambda: f"`group_size` = {group_size} does not divide in_features K = {k}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_tensor(OP, name, t, ndim=3, dtype=x.dtype, device=x.device)
        check(t.shape == (e, n, k // group_size), OP,
              lambda: f"`{name}` must be [E, N, K // group_size] = [{e}, {n}, {k // group_size}], got {tuple(t.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=2, dtype=x.dtype, device=x.device)
        check(bias.shape == (e, n), OP, lambda: f"`bias` must be [E, N] = [{e}, {n}], got {tuple(bias.shape)}")


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
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise NotImplementedError("reparam.grouped_int4_linear: no gradient for the experts' scales and zeros; "
                                  "train them through the per-expert int4_linear (UnfusedExperts does when "
                                  "they require grad)")
    gx = torch.zeros(gy.shape[0], 2 * qweight.shape[2], dtype=gy.dtype, device=gy.device)
    gb = torch.zeros(qweight.shape[0], qweight.shape[1], dtype=gy.dtype, device=gy.device) if ctx.has_bias else None
    bounds = offsets.tolist()  # backward may sync: training runs outside CUDA graphs
    for e in range(qweight.shape[0]):
        lo, hi = max(bounds[e], 0), min(bounds[e + 1], gy.shape[0])
        if hi > lo:
            gx[lo:hi] = gy[lo:hi] @ dequantize_int4(qweight[e], scales[e], zeros[e], ctx.group_size, gy.dtype)
            if gb is not None:
                gb[e] = gy[lo:hi].sum(0)
    return gx, None, None, None, None, None, gb


torch.library.register_autograd("reparam::grouped_int4_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec(OP, reference.grouped_int4_linear, triton=_triton.grouped_int4_linear))
