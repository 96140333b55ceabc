"""pivoted_lowrank_linear: y = (x[..., perm[:r]] + x[..., perm[r:]] @ w.T) @ u.T + bias.

A rank-r weight W = u @ v stored with r columns of v made the identity (W = u @ [I | w] @ P):
r·(N + K − r) parameters instead of r·(N + K). Layout: u [N, r] and w [r, K − r] row-major with the
reduction dim contiguous (as lowrank_linear's u, v); perm int64 [K], a permutation of 0..K−1 whose
first r entries are the pivot columns (checked where layers are built, not per call).
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec

_OP = "pivoted_lowrank_linear"


def _check_pivoted(x, u, w, perm, bias):
    check_tensor(_OP, "u", u, ndim=2, dtype=x.dtype, device=x.device)
    check_tensor(_OP, "w", w, ndim=2, dtype=x.dtype, device=x.device)
    check_tensor(_OP, "perm", perm, ndim=1, dtype=torch.int64, device=x.device)
    r = u.shape[1]
    check(r >= 1, _OP, lambda: f"rank must be >= 1, got `u` {tuple(u.shape)}")
    check(w.shape[0] == r, _OP, lambda: f"rank mismatch: `u` is {tuple(u.shape)} = [N, r] and `w` is {tuple(w.shape)} = [r, K - r]")
    k = r + w.shape[1]
    check(perm.shape[0] == k, _OP, lambda: f"`perm` must have K = r + w.shape[1] = {k} entries, got {perm.shape[0]}")
    check_x(_OP, x, k)
    check_bias(_OP, bias, u.shape[0], x)


def pivoted_lowrank_linear(x, u, w, perm, bias=None):
    """y = x @ W.T + bias for W = u @ [I | w] @ P (u [N, r], w [r, K − r], perm [K]); x is [..., K]."""
    x, u, w, bias = _dispatch.autocast(x, u, w, bias)
    _check_pivoted(x, u, w, perm, bias)
    return _dispatch.call(_OP, x, u, w, perm, bias)


@torch.library.register_fake("reparam::pivoted_lowrank_linear")
def _pivoted_fake(x, u, w, perm, bias):
    _check_pivoted(x, u, w, perm, bias)
    return x.new_empty((*x.shape[:-1], u.shape[0]))


def _pivoted_setup(ctx, inputs, output):
    x, u, w, perm, bias = inputs
    ctx.save_for_backward(x, u, w, perm)
    ctx.has_bias = bias is not None


def _pivoted_backward(ctx, gy):
    x, u, w, perm = ctx.saved_tensors
    r = u.shape[1]
    xp = x.reshape(-1, x.shape[-1]).index_select(1, perm)
    g2 = gy.reshape(-1, gy.shape[-1])
    gt = g2 @ u  # [M, r]: gradient of the intermediate t = x_piv + x_rest @ w.T
    gx = gu = gw = gb = None
    if ctx.needs_input_grad[0]:
        gxp = torch.cat([gt, gt @ w], 1)  # gradient w.r.t. the permuted x
        gx = torch.empty_like(gxp).index_copy_(1, perm, gxp).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        gu = g2.t() @ (xp[:, :r] + xp[:, r:] @ w.t())
    if ctx.needs_input_grad[2]:
        gw = gt.t() @ xp[:, r:]
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g2.sum(0)
    return gx, gu, gw, None, gb


torch.library.register_autograd("reparam::pivoted_lowrank_linear", _pivoted_backward, setup_context=_pivoted_setup)
_dispatch.register(OpSpec(_OP, reference.pivoted_lowrank_linear, triton=_triton.pivoted_lowrank_linear))
