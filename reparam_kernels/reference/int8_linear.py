import torch


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def int8_linear(x, qweight, scales, bias=None):
    """y = (x @ qweight.T) * scales + bias; qweight int8 [N, K], scales [N]; fp32 accumulation."""
    acc = _acc_dtype(x.dtype)
    y = (x.to(acc) @ qweight.to(acc).t()) * scales.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
