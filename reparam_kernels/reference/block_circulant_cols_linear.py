import torch

from .block_circulant_linear import block_circulant_linear
from .._dtypes import acc_dtype


def cols_spectrum(w_cols, dtype):
    """The spectrum layout of block_circulant_linear ([p, q, 2, b//2+1]) of block columns [p, q, b]."""
    spec = torch.fft.rfft(w_cols.to(dtype), dim=-1)
    return torch.stack((spec.real, spec.imag), dim=2)


def block_circulant_cols_linear(x, w_cols, out_features, bias=None):
    """y = W x + bias, W [N, K] of b×b circulant blocks given by their first columns:
    W[i b + n, j b + m] = w_cols[i, j, (n − m) mod b]. Through the spectrum (the same math as
    block_circulant_linear); fp32 math (fp64 for fp64 x); returns x's dtype."""
    acc = acc_dtype(x.dtype)
    return block_circulant_linear(x, cols_spectrum(w_cols, acc), w_cols.shape[-1], out_features, bias)
