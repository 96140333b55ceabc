import torch

from .._dtypes import acc_dtype
from .int4_linear import unpack_nibbles


def dequantize_lut(codes, lut, dtype):
    """W [N, K] with W[n, k] = lut[n // (N / L), code[n, k]], codes packed 4-bit uint8 [N, K/2]
    (low nibble = even k), lut [L, 16]."""
    n = codes.shape[0]
    c = unpack_nibbles(codes).long()
    rows_per_table = n // lut.shape[0]
    table = lut.to(dtype).repeat_interleave(rows_per_table, dim=0)  # [N, 16]
    return torch.gather(table, 1, c)


def lut_linear(x, codes, lut, bias=None):
    """y = x @ W.T + bias with W decoded through the per-row-group lookup table; fp32 accumulation."""
    acc = acc_dtype(x.dtype)
    w = dequantize_lut(codes, lut, acc)
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
