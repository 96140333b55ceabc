import torch

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


def expand_right_factor(w, perm, dtype=None):
    """v = [I | w]·P [r, in] from w [r, in − r] and perm [in]: the plain right factor of the same weight."""
    r = w.shape[0]
    v = torch.empty(r, perm.numel(), dtype=dtype or w.dtype, device=w.device)
    v[:, perm[:r]] = torch.eye(r, dtype=v.dtype, device=v.device)
    v[:, perm[r:]] = w.to(v.dtype)
    return v
