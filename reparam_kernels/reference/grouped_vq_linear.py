from ._grouped import per_expert
from .vq_linear import vq_linear


def grouped_vq_linear(x, expert_offsets, codes, codebooks, bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's vector-quantized weight (vq_linear with
    codes[e], codebooks[e], bias[e]); rows in no expert's range give zeros. fp32 accumulation."""
    return per_expert(x, expert_offsets, codes.shape[0], codes.shape[1], lambda rows, e: vq_linear(
        rows, codes[e], codebooks[e], None if bias is None else bias[e]))
