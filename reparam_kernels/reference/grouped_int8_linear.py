from ._grouped import per_expert
from .int8_linear import int8_linear


def grouped_int8_linear(x, expert_offsets, qweight, scales, bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's int8 weight (int8_linear with
    qweight[e], scales[e], bias[e]); rows in no expert's range give zeros. fp32 accumulation."""
    return per_expert(x, expert_offsets, qweight.shape[0], qweight.shape[1], lambda rows, e: int8_linear(
        rows, qweight[e], scales[e], None if bias is None else bias[e]))
