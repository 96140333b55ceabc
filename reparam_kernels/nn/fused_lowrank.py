"""Sibling low-rank layers of one input, fused (``fuse_projections``): their right factors stacked into one
product t = x·vᵀ for all of them, each left factor applied to its own columns of t.

Low-rank siblings cannot become one LowRankLinear: the fused layer's left factor would be block-diagonal,
and storing it as one [Σ out, Σ r] matrix reads its zeros too (2.3× the bytes of q/k/v at 40% fewer
parameters). Stacking only the right factors keeps every byte and still saves launches: a Llama attention
block's q/k/v take 4 products instead of 6, its MLP's gate/up 3 instead of 4, and the stacked product runs on
a grid sized for all three (Llama-3-8B's k / v alone leave most SMs idle). Both products are the ones
``lowrank_linear`` itself takes at decode on the GPU (two cuBLAS GEMMs since the H200 measured them faster than
the fused launch at every M), so nothing else changes. Plain factors only: pivoted siblings gather different
columns of x each.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import LowRankLinear


class FusedLowRank(nn.Module):
    """v [Σ r, K] stacked, us[i] [out_i, r_i] apart, bias [Σ out] (zeros for a sibling without one)."""

    def __init__(self, members):
        super().__init__()
        self.in_features = members[0].in_features
        self.sizes = tuple(m.out_features for m in members)
        self.ranks = tuple(m.rank for m in members)
        self.out_features = sum(self.sizes)
        grad = any(m.v.requires_grad for m in members)
        self.v = nn.Parameter(torch.cat([m.v.detach() for m in members]), requires_grad=grad)
        self.us = nn.ParameterList([nn.Parameter(m.u.detach().clone(), requires_grad=m.u.requires_grad)
                                    for m in members])
        biased = [m.bias is not None for m in members]
        self.bias = None
        if any(biased):
            self.bias = nn.Parameter(torch.cat([m.bias.detach() if m.bias is not None
                                                else m.u.new_zeros(m.out_features) for m in members]),
                                     requires_grad=any(m.bias.requires_grad for m in members if m.bias is not None))

    def forward(self, x):
        """The siblings' outputs, as a tuple (never concatenated: each slice takes its own)."""
        t = F.linear(x, self.v)
        parts, r0, n0 = [], 0, 0
        for u, r, n in zip(self.us, self.ranks, self.sizes):
            b = self.bias[n0:n0 + n] if self.bias is not None else None
            parts.append(F.linear(t[..., r0:r0 + r], u, b))
            r0, n0 = r0 + r, n0 + n
        return tuple(parts)

    def split(self, biased):
        """The siblings back as LowRankLinear layers (the same values, row for row); biased[i]: i had a bias."""
        members, r0, n0 = [], 0, 0
        for u, r, n, has_bias in zip(self.us, self.ranks, self.sizes, biased):
            m = LowRankLinear(self.in_features, n, r, bias=has_bias, dtype=u.dtype, device=u.device)
            with torch.no_grad():
                m.u.copy_(u)
                m.v.copy_(self.v[r0:r0 + r])
                if has_bias:
                    m.bias.copy_(self.bias[n0:n0 + n])
            m.u.requires_grad_(u.requires_grad)
            m.v.requires_grad_(self.v.requires_grad)
            if has_bias:
                m.bias.requires_grad_(self.bias.requires_grad)
            members.append(m)
            r0, n0 = r0 + r, n0 + n
        return members

    def extra_repr(self):
        return f"in_features={self.in_features}, sizes={list(self.sizes)}, ranks={list(self.ranks)}"
