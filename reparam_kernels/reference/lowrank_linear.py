from .._dtypes import acc_dtype


def lowrank_linear(x, u, v, bias=None):
    """y = x @ v.T @ u.T + bias, with u [N, r], v [r, K]; fp32 accumulation."""
    acc = acc_dtype(x.dtype)
    t = x.to(acc) @ v.to(acc).t()
    y = t @ u.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
