import torch

from .int4_linear import int4_linear


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's int4 weight (int4_linear with
    qweight[e], scales[e], zeros[e], bias[e]); rows in no expert's range give zeros. fp32 accumulation."""
    y = x.new_zeros((x.shape[0], qweight.shape[1]))
    bounds = expert_offsets.tolist()  # the reference may read the offsets on the host; the kernels do not
    for e in range(qweight.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = int4_linear(x[lo:hi], qweight[e], scales[e], zeros[e], group_size,
                                   None if bias is None else bias[e])
    return y
