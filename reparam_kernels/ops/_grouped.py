"""What the grouped ops (a mixture-of-experts layer's experts in one call) share.

x [T, K] holds the routed rows sorted by expert; rows expert_offsets[e]:expert_offsets[e+1] go through expert
e's weight (the format's tensors with a leading expert dimension, bias [E, N]); rows in no expert's range
(after expert_offsets[E]: tokens routed elsewhere, an expert-parallel sentinel) come out as zeros. Every
shape is static and the offsets stay on the device, so a call is capturable in a CUDA graph and one node
under torch.compile (``compress.experts.UnfusedExperts`` builds the sort and the offsets). The offsets must
be non-decreasing; the kernels clamp them to [0, T] (no out-of-bounds access) but cannot diagnose them
without a host sync.
"""
import torch

from .._checks import check, check_tensor, check_x


def check_rows_offsets_bias(op, x, expert_offsets, experts, k, n, bias):
    check_x(op, x, k)
    check(x.dim() == 2, op, lambda: f"`x` must be 2-D [rows, in_features], got shape {tuple(x.shape)}")
    check_tensor(op, "expert_offsets", expert_offsets, ndim=1, dtype=torch.int64, device=x.device)
    check(expert_offsets.shape[0] == experts + 1, op,
          lambda: f"`expert_offsets` must have experts + 1 = {experts + 1} entries, got {expert_offsets.shape[0]}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=2, dtype=x.dtype, device=x.device)
        check(bias.shape == (experts, n), op,
              lambda: f"`bias` must be [E, N] = [{experts}, {n}], got {tuple(bias.shape)}")


def backward_x_and_bias(op, ctx, gy, offsets, experts, k, dense_weight, weights_need_grad):
    """(gx, gb) of a grouped op; dense_weight(e, dtype) is expert e's [N, K] weight. weights_need_grad: whether
    the format's own tensors (scales, codebooks …) were asked for a gradient, which the grouped ops do not give."""
    if weights_need_grad:
        raise NotImplementedError(f"reparam.{op}: no gradient for the experts' quantization tensors; train them "
                                  "through the per-expert op (UnfusedExperts does when they require grad)")
    gx = torch.zeros(gy.shape[0], k, dtype=gy.dtype, device=gy.device)
    gb = torch.zeros(experts, gy.shape[1], dtype=gy.dtype, device=gy.device) if ctx.has_bias else None
    bounds = offsets.tolist()  # backward may sync: training runs outside CUDA graphs
    for e in range(experts):
        lo, hi = max(bounds[e], 0), min(bounds[e + 1], gy.shape[0])
        if hi > lo:
            gx[lo:hi] = gy[lo:hi] @ dense_weight(e, gy.dtype)
            if gb is not None:
                gb[e] = gy[lo:hi].sum(0)
    return gx, gb
