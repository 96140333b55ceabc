from .._dtypes import acc_dtype


def pivoted_lowrank_linear(x, u, w, perm, bias=None):
    """y = (x[..., perm[:r]] + x[..., perm[r:]] @ w.T) @ u.T + bias; u [N, r], w [r, K - r], perm [K].

    The weight is W = u @ [I | w] @ P (P the column permutation `perm`); fp32 accumulation."""
    acc = acc_dtype(x.dtype)
    r = u.shape[1]
    xp = x.to(acc).index_select(-1, perm)
    t = xp[..., :r] + xp[..., r:] @ w.to(acc).t()
    y = t @ u.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
