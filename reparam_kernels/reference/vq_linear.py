import torch

from .._dtypes import acc_dtype


def dequantize_vq(codes, codebooks, dtype):
    """W [N, K] with W[n, k] = codebooks[n // (N / L), codes[n, k // d], k % d]; codes [N, K/d] (any integer
    dtype), codebooks [L, E, d]."""
    n, kd = codes.shape
    nl, _, d = codebooks.shape
    book_of_row = torch.arange(n, device=codes.device) // (n // nl)
    return codebooks.to(dtype)[book_of_row[:, None], codes.long()].reshape(n, kd * d)


def vq_linear(x, codes, codebooks, bias=None):
    """y = x @ W.T + bias with W decoded from the sub-vector codes through the row group's codebook; fp32
    accumulation."""
    acc = acc_dtype(x.dtype)
    y = x.to(acc) @ dequantize_vq(codes, codebooks, acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
