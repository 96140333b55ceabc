import torch


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lowrank_linear(x, u, v, bias=None):
    """y = x @ v.T @ u.T + bias, with u [N, r], v [r, K]; fp32 accumulation."""
    acc = _acc_dtype(x.dtype)
    t = x.to(acc) @ v.to(acc).t()
    y = t @ u.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
