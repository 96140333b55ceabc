from ._grouped import per_expert
from .int4_linear import int4_linear


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's int4 weight (int4_linear with
    qweight[e], scales[e], zeros[e], bias[e]); rows in no expert's range give zeros. fp32 accumulation."""
    return per_expert(x, expert_offsets, qweight.shape[0], qweight.shape[1], lambda rows, e: int4_linear(
        rows, qweight[e], scales[e], zeros[e], group_size, None if bias is None else bias[e]))
