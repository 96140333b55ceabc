"""grouped_lowrank_linear: a mixture-of-experts layer's low-rank experts in one call, with no host sync.

A global rank allocation gives every expert its own rank r_e, so the factors are not padded to one shape: they
are stored flat, one expert after the other (``stack_factors``), and ``factor_offsets`` [2, E + 1] says where
each starts — row 0 the cumulative ranks (expert e's u[e] [N, r_e] at element N·row0[e] of u), row 1 each v[e]'s
first element. v[e] is [r_e, K] (LowRankLinear); with ``perm`` [E, K] given, an expert whose segment holds
r_e·(K − r_e) elements is pivoted, v[e] its right factor w[e] [r_e, K − r_e] of W = u·[I | w]·P
(PivotedLowRankLinear), and one of r_e·K elements plain, its perm row the identity (so one group mixes both,
and dense experts: ``stack_factors``). ``max_rank`` (≥ every r_e) is the width of the
kernels' intermediate x·vᵀ [T, max_rank] (fp32, the one global round trip: two grouped GEMMs as two cuBLAS calls
would be). ``row_align`` (1, 2, 4 or 8) divides every rank and every factor row's length: the kernels' weight
rows have runtime lengths, and this promise is what lets them load 16 bytes at a time (8: ranks in multiples of
8 and K a multiple of 8, as the default recipe's rounding gives; a broken promise is a misaligned-address error
on the GPU). x, expert_offsets and the rows no expert takes as every grouped op's (ops/_grouped.py).

The flat layout is trusted on a GPU (checking it would read factor_offsets on the host every call); the kernels
clamp each rank to [0, max_rank] and the pivots to [0, K), and skip an expert whose factor would reach outside its
tensor, so a bad layout gives wrong numbers, never a read out of bounds (a broken row_align: a misaligned-address
error). On the CPU the wrapper checks it.
Autograd: gradient for x and bias; the factors train through the per-expert path.
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_tensor
from .._dispatch import OpSpec
from ..reference.grouped_lowrank_linear import expert_factors
from ..reference.pivoted_lowrank_linear import expand_right_factor
from ._grouped import backward_x_and_bias, check_rows_offsets_bias

OP = "grouped_lowrank_linear"


def check_grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align,
                                 bias, layout=True):
    """layout: also check the flat layout's values where they are on the CPU (not for fake tensors)."""
    check_tensor(OP, "factor_offsets", factor_offsets, ndim=2, dtype=torch.int64, device=x.device)
    check(factor_offsets.shape[0] == 2 and factor_offsets.shape[1] >= 2, OP,
          lambda: f"`factor_offsets` must be [2, E + 1] with E >= 1, got {tuple(factor_offsets.shape)}")
    e = factor_offsets.shape[1] - 1
    for name, val in (("out_features", out_features), ("max_rank", max_rank)):
        check(isinstance(val, int) and not isinstance(val, bool) and val > 0, OP,
              lambda: f"`{name}` must be a positive int, got {val!r}")
    check(row_align in (1, 2, 4, 8) and not isinstance(row_align, bool), OP,
          lambda: f"`row_align` must be 1, 2, 4 or 8, got {row_align!r}")
    if perm is not None:  # (K from perm, so a wrong x is named as x)
        check_tensor(OP, "perm", perm, ndim=2, dtype=torch.int64, device=factor_offsets.device)
        check(perm.shape[0] == e, OP, lambda: f"`perm` must be [E, K] with E = {e}, got {tuple(perm.shape)}")
    k = x.shape[-1] if perm is None or x.dim() == 0 else perm.shape[1]
    check_rows_offsets_bias(OP, x, expert_offsets, e, k, out_features, bias)
    for name, t in (("u", u), ("v", v)):
        check_tensor(OP, name, t, ndim=1, dtype=x.dtype, device=x.device)
    if layout and factor_offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_layout(factor_offsets, u, v, perm is not None, out_features, k, max_rank, row_align)


def _check_layout(factor_offsets, u, v, pivoted, n, k, max_rank, row_align):
    """The flat layout itself (host values: only where they cost no device sync)."""
    ro, vo = factor_offsets.tolist()
    ranks = [b - a for a, b in zip(ro, ro[1:])]
    check(ro[0] == 0 and vo[0] == 0 and min(ranks) >= 0, OP,
          lambda: f"`factor_offsets` must start at 0 and not decrease, got {factor_offsets.tolist()}")
    check(max(ranks) <= min(max_rank, k), OP,
          lambda: f"an expert's rank {max(ranks)} exceeds `max_rank` = {max_rank} or K = {k}")
    steps = [b - a for a, b in zip(vo, vo[1:])]
    check(all(s == r * k or (pivoted and s == r * (k - r)) for s, r in zip(steps, ranks)), OP,
          lambda: f"`factor_offsets` row 1 must step by each expert's r·K{' or r·(K − r)' if pivoted else ''} "
                  f"elements of `v` (ranks {ranks}), got {vo}")
    check(all(r % row_align == 0 and (r == 0 or (s // r) % row_align == 0) for r, s in zip(ranks, steps)), OP,
          lambda: f"`row_align` = {row_align} must divide every rank ({ranks}) and factor row length")
    check(u.numel() == n * ro[-1] and v.numel() == vo[-1], OP,
          lambda: f"`u` must hold N·Σr = {n * ro[-1]} and `v` {vo[-1]} elements, got {u.numel()} and {v.numel()}")


def grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align=1,
                           bias=None):
    """y [T, N]: x's rows through their experts' low-rank weights (see the module doc; ``stack_factors`` builds
    u, v, perm, factor_offsets, max_rank and row_align from per-expert factors)."""
    x, u, v, bias = _dispatch.autocast(x, u, v, bias)
    check_grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align,
                                 bias)
    return _dispatch.call(OP, x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align,
                          bias)


def stack_factors(us, vs, perms=None):
    """(u, v, perm, factor_offsets, max_rank, row_align) for the op from each expert's u [N, r_e] and v [r_e, K] (pivoted:
    w [r_e, K − r_e] and perms[e] [K]; a perms entry None for a plain expert among pivoted ones); the flat
    tensors are new storage, on the factors' device. A dense expert W [N, K] is exactly u = W, w [K, 0], perm the
    identity (pivoted, N ≥ K: nothing added) or u = I_N, v = W (plain: N² more elements, N < K)."""
    n = us[0].shape[0]
    ranks = [t.shape[1] for t in us]
    sizes = [t.numel() for t in vs]
    device = us[0].device
    ro = torch.tensor([0] + ranks, dtype=torch.int64).cumsum(0)
    vo = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    if any(t.shape[0] != n for t in us) or any(t.shape[0] != r for t, r in zip(vs, ranks)):
        raise ValueError("stack_factors: every u must be [N, r_e] with one N, and v[e] must have r_e rows")
    u = torch.cat([t.reshape(-1) for t in us])
    v = torch.cat([t.reshape(-1) for t in vs])
    k = vs[0].shape[1] + (0 if perms is None or perms[0] is None else ranks[0])
    perm = None if perms is None else torch.stack(
        [torch.arange(k, device=device) if p is None else p for p in perms])
    lengths = ranks + [t.shape[1] for t in vs if t.shape[0] > 0]  # u's rows are r long, v's K or K − r
    align = next(a for a in (8, 4, 2, 1) if all(length % a == 0 for length in lengths))
    return u, v, perm, torch.stack([ro, vo]).to(device), max(max(ranks), 1), align


@torch.library.register_fake("reparam::grouped_lowrank_linear")
def _fake(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align, bias):
    check_grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align,
                                 bias, layout=False)
    return x.new_empty((x.shape[0], out_features))


def _setup(ctx, inputs, output):
    x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align, bias = inputs
    ctx.save_for_backward(expert_offsets, u, v, perm, factor_offsets)
    ctx.has_bias, ctx.n, ctx.k = bias is not None, out_features, x.shape[-1]


def _backward(ctx, gy):
    offsets, u, v, perm, factor_offsets = ctx.saved_tensors
    bounds = factor_offsets.tolist()  # backward may sync (training runs outside CUDA graphs)

    def dense_weight(e, dt):
        ue, ve, pe = expert_factors(u, v, perm, factor_offsets, ctx.n, ctx.k, e, bounds)
        right = ve.double() if pe is None else expand_right_factor(ve, pe, torch.float64)
        return (ue.double() @ right).to(dt)

    gx, gb = backward_x_and_bias(OP, ctx, gy, offsets, factor_offsets.shape[1] - 1, ctx.k, dense_weight,
                                 ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    return gx, None, None, None, None, None, None, None, None, gb


torch.library.register_autograd("reparam::grouped_lowrank_linear", _backward, setup_context=_setup)


def fast_layout(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align=1, bias=None):
    """Whether the CUDA kernel's small-M loop takes the factors (16-byte rows: csrc/grouped_lowrank_linear.cu)."""
    return row_align == 8 and (x.shape[-1] if perm is None else perm.shape[1]) % 8 == 0


_dispatch.register(OpSpec(OP, reference.grouped_lowrank_linear, triton=_triton.grouped_lowrank_linear,
                          fast_layout=fast_layout))
