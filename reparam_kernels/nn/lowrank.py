"""LowRankLinear: a Linear whose weight is stored as W ≈ u @ v.

Layout (what the ``lowrank_linear`` op wants): ``u`` [out_features, rank] and
``v`` [rank, in_features], both row-major and contiguous; the forward pass is
one call of ``reparam_kernels.ops.lowrank_linear`` (fused kernel on CUDA, the
reference on the CPU). Parameters: rank·(out + in) (+ out for the bias)
instead of out·in.
"""
import torch
from torch import nn

from .._linear import linear_from
from ..compress import svd as _svd
from ..ops import lowrank_linear
from .._dtypes import acc_dtype


def check_dims(in_features, out_features, rank):
    """Constructor arguments of the low-rank layers: positive ints, rank ≤ min(in, out)."""
    for name, val in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"`{name}` must be a positive int, got {val!r}")
    if rank > min(in_features, out_features):
        raise ValueError(f"`rank` {rank} exceeds min(in_features, out_features) = {min(in_features, out_features)}")


def factor_linear(linear, rank=None, ratio=None, energy=None, calib=None, damping=1e-5, out_weight=None,
                  ratio_rank=None):
    """(u [out, r], v [r, in], weight) of a dense Linear-like module: plain truncated SVD, or whitened
    (activation-aware) SVD when `calib` is given (see ``LowRankLinear.from_linear``).
    ratio_rank: for a layer that counts its parameters its own way, (out, in, ratio) → the rank `ratio` buys."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"`linear` must be an nn.Linear-like module with a 2-D weight, got {type(linear).__name__}")
    if ratio is not None and ratio_rank is not None:
        given = [n for n, v in (("rank", rank), ("energy", energy)) if v is not None]
        if given:
            raise ValueError(f"give exactly one of `rank`, `ratio`, `energy`; got ratio and {given}")
        rank, ratio = ratio_rank(*weight.shape, ratio), None
    if calib is None:
        if out_weight is not None:
            raise ValueError("`out_weight` needs `calib` (output weighting is part of the whitened SVD)")
        u, v, _ = _svd.truncated_svd(weight, rank=rank, ratio=ratio, energy=energy)
    else:
        u, v, _ = _svd.whitened_svd(weight, calib, rank=rank, ratio=ratio, energy=energy, damping=damping,
                                    out_weight=out_weight)
    return u, v, weight


def check_factors(u, v):
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(f"`u` [out, r] and `v` [r, in] do not fit: {tuple(u.shape)} and {tuple(v.shape)}")


def build_from_factors(cls, u, v, bias, dtype, device, state):
    """cls(in, out, rank) for factors u [out, r], v [r, in], with its tensors `state` {name: value} and the
    bias copied in; dtype / device default to u's."""
    check_factors(u, v)
    layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, dtype=dtype or u.dtype,
                device=device or u.device)
    with torch.no_grad():
        for name, value in state.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


class LowRankBase(nn.Module):
    """in_features, out_features, rank (checked) and the left factor u [out, rank] of the low-rank layers."""

    def __init__(self, in_features, out_features, rank, dtype=None, device=None):
        super().__init__()
        check_dims(in_features, out_features, rank)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))


class LowRankLinear(LowRankBase):
    def __init__(self, in_features, out_features, rank, bias=True, dtype=None, device=None):
        super().__init__(in_features, out_features, rank, dtype, device)
        kw = {"dtype": dtype, "device": device}
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # Uniform init so that u @ v has entries of the order of nn.Linear's default (1/√in);
        # layers made by from_linear overwrite it anyway.
        bound_v = (1.0 / self.in_features) ** 0.5
        bound_u = (1.0 / self.rank) ** 0.5
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -bound_u, bound_u)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    @classmethod
    def from_linear(cls, linear, rank=None, ratio=None, energy=None, calib=None, damping=1e-5, out_weight=None):
        """Factor a dense ``nn.Linear`` (its dtype and device are kept).

        Exactly one of:
          rank   — the rank, 1 ≤ rank ≤ min(out, in);
          ratio  — fraction of the dense layer's weight parameters to REMOVE,
                   0 < ratio < 1 (ratio=0.2 → at most 80% of out·in remain);
          energy — fraction of Σσ² to keep, 0 < energy ≤ 1.
        calib: the layer's inputs X [n, in_features] (or a ``CalibStats``);
        when given, activation-aware (whitened, SVD-LLM) SVD is used, which
        minimizes the output error on those inputs instead of the weight error.
        out_weight: with calib, per-output-channel weights of that error
        (√Fisher from ``compress.fisher`` makes it a loss-increase estimate).
        """
        u, v, weight = factor_linear(linear, rank, ratio, energy, calib, damping, out_weight)
        return cls.from_factors(u, v, linear.bias, dtype=weight.dtype, device=weight.device)

    @classmethod
    def from_factors(cls, u, v, bias=None, dtype=None, device=None):
        """Build from given factors u [out, r], v [r, in] (and an optional bias [out])."""
        return build_from_factors(cls, u, v, bias, dtype, device, {"u": u, "v": v})

    def to_dense(self):
        """The effective dense weight [out, in] = u @ v (in the layer's dtype, fp32 accumulation)."""
        acc = acc_dtype(self.u.dtype)
        return (self.u.to(acc) @ self.v.to(acc)).to(self.u.dtype)

    def to_linear(self):
        return linear_from(self.to_dense().detach(), self.bias)

    def forward(self, x):
        return lowrank_linear(x, self.u, self.v, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
