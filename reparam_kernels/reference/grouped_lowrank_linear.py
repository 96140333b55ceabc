from ._grouped import per_expert
from .lowrank_linear import lowrank_linear
from .pivoted_lowrank_linear import pivoted_lowrank_linear


def expert_factors(u, v, perm, factor_offsets, n, k, e, bounds=None):
    """Expert e's factors as views of the flat storage: (u [N, r], v [r, K], None) for a plain expert, (u [N, r],
    w [r, K − r], perm [K]) for a pivoted one — with perm given, an expert whose v segment holds r·(K − r) < r·K
    elements. bounds: factor_offsets.tolist(), read once by a caller looping over the experts."""
    ro, vo = bounds if bounds is not None else factor_offsets.tolist()
    r = ro[e + 1] - ro[e]
    ue = u[n * ro[e]:n * ro[e + 1]].view(n, r)
    if perm is None or vo[e + 1] - vo[e] == r * k:
        return ue, v[vo[e]:vo[e + 1]].view(r, k), None
    return ue, v[vo[e]:vo[e + 1]].view(r, k - r), perm[e]


def grouped_lowrank_linear(x, expert_offsets, u, v, perm, factor_offsets, out_features, max_rank, row_align,
                           bias=None):
    """Rows expert_offsets[e]:expert_offsets[e+1] of x through expert e's low-rank weight (lowrank_linear, or
    pivoted_lowrank_linear when perm is given, with expert_factors' views and bias[e]); rows in no expert's range
    give zeros. fp32 accumulation. max_rank (the kernels' intermediate width) and row_align (their load widths)
    the reference does not need."""
    bounds = factor_offsets.tolist()
    k = x.shape[-1]

    def linear(rows, e):
        ue, ve, pe = expert_factors(u, v, perm, factor_offsets, out_features, k, e, bounds)
        b = None if bias is None else bias[e]
        return lowrank_linear(rows, ue, ve, b) if pe is None else pivoted_lowrank_linear(rows, ue, ve, pe, b)

    return per_expert(x, expert_offsets, factor_offsets.shape[1] - 1, out_features, linear)
