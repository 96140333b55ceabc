from .._dtypes import acc_dtype


def int8_linear(x, qweight, scales, bias=None):
    """y = (x @ qweight.T) * scales + bias; qweight int8 [N, K], scales [N]; fp32 accumulation."""
    acc = acc_dtype(x.dtype)
    y = (x.to(acc) @ qweight.to(acc).t()) * scales.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
