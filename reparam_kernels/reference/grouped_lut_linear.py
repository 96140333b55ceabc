from ._grouped import per_expert
from .lut_linear import lut_linear


def grouped_lut_linear(x, expert_offsets, codes, lut, bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's lookup-table weight (lut_linear with
    codes[e], lut[e], bias[e]); rows in no expert's range give zeros. fp32 accumulation."""
    return per_expert(x, expert_offsets, codes.shape[0], codes.shape[1], lambda rows, e: lut_linear(
        rows, codes[e], lut[e], None if bias is None else bias[e]))
