import torch

from .._dtypes import acc_dtype


def unpack_nibbles(packed):
    """uint8 [N, K/2] → uint8 codes [N, K]: two 4-bit codes per byte, low nibble = even k."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(qweight, scales, zeros, group_size, dtype):
    """W [N, K] = (q - zeros[:, k // group_size]) * scales[:, k // group_size], q from the packed
    uint8 [N, K/2] (low nibble = even k)."""
    n = qweight.shape[0]
    q = unpack_nibbles(qweight).to(dtype)
    g = q.shape[1] // group_size
    qg = q.reshape(n, g, group_size)
    w = (qg - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]
    return w.reshape(n, g * group_size)


def int4_linear(x, qweight, scales, zeros, group_size, bias=None):
    """y = x @ W.T + bias with W dequantized from group-wise int4 (see dequantize_int4); fp32 accumulation."""
    acc = acc_dtype(x.dtype)
    w = dequantize_int4(qweight, scales, zeros, group_size, acc)
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
