import torch

from .._dtypes import acc_dtype


def dequantize_int4(qweight, scales, zeros, group_size, dtype):
    """W [N, K] = (q - zeros[:, k // group_size]) * scales[:, k // group_size], q from the packed
    uint8 [N, K/2] (low nibble = even k)."""
    n = qweight.shape[0]
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(n, -1).to(dtype)
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
