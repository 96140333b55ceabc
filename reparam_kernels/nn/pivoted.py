"""PivotedLowRankLinear: a rank-r weight stored with r columns of its right factor as the identity.

Any rank-r W = u·v (v [r, in]) can be rewritten exactly as W = u'·[I | w]·P: pick r well-conditioned
"pivot" columns of v (QR with column pivoting), v_p = v[:, pivots], then u' = u·v_p and
w = v_p⁻¹·v[:, rest]. Storage: u' [out, r], w [r, in − r] and the permutation perm [in] (pivots
first) — r·(out + in − r) parameters instead of r·(out + in). At the same parameter budget the rank
can be larger: SmolLM2-135M, default recipe at 20% fewer parameters, perplexity 23.27 against 27.18
for the plain factors (docs/quality.md). Forward: one ``pivoted_lowrank_linear`` op (on a GPU the fused
low-rank CUDA kernel in its pivoted mode, csrc/pivoted_lowrank_linear.cu; the reference on the CPU).
"""
import numpy as np
import torch
from torch import nn

from ..compress import svd as _svd
from ..ops import pivoted_lowrank_linear
from .lowrank import LowRankBase, LowRankLinear, build_from_factors, check_factors, factor_linear
from .._dtypes import acc_dtype
from ..reference.pivoted_lowrank_linear import expand_right_factor  # noqa: F401 (its home: beside the reference)


def pivot_factors(u, v):
    """(u' [out, r], w [r, in − r], perm [in] int64) with u @ v == u' @ [I | w] @ P, in float64, on the
    device the factorizations run on (``svd.factor_device``)."""
    dev = _svd.factor_device(v)
    u64, v64 = u.detach().to(dev, torch.float64), v.detach().to(dev, torch.float64)
    r, n = v64.shape
    piv = _pivots(v64)
    rest = torch.ones(n, dtype=torch.bool, device=dev)
    rest[piv] = False
    perm = torch.cat([piv, rest.nonzero().squeeze(1)])
    vp = v64[:, piv]
    w = torch.linalg.solve(vp, v64[:, perm[r:]])
    return u64 @ vp, w, perm


def _pivots(v):
    """The r pivot columns of QR with column pivoting of v [r, n]: on the CPU LAPACK's geqp3 (5× faster
    than the loop below there), on a GPU (or without SciPy) ``greedy_pivots``; both choose the same columns."""
    try:
        import scipy.linalg
    except ImportError:
        scipy = None
    if v.device.type != "cpu" or scipy is None:
        return greedy_pivots(v)
    _, piv = scipy.linalg.qr(v.numpy(), mode="r", pivoting=True)
    return torch.from_numpy(np.ascontiguousarray(piv[:v.shape[0]])).long()


def greedy_pivots(v):
    """Businger–Golub column pivoting in torch: r times, take the column of largest remaining norm and
    project its direction out of every column. r rank-1 updates of v (float64), no host syncs — on a
    GPU for an 8B down projection (r ≈ 2600, n = 14336) ~3 TB of memory traffic, against ~50 s of
    LAPACK on two CPU cores (measured at 1/64 scale: 0.76 s for 1024 × 3584).
    Norms are recomputed each step rather than downdated, which loses accuracy as they shrink."""
    R = v.to(torch.float64).clone()
    r = R.shape[0]
    piv = torch.empty(r, dtype=torch.long, device=R.device)
    for k in range(r):
        norms = torch.linalg.vector_norm(R, dim=0)  # one reduction pass, no squared copy of R
        j = norms.argmax()
        piv[k] = j
        q = R.index_select(1, j.view(1)).squeeze(1) / norms[j].clamp_min(1e-300)
        R.addr_(q, q @ R, alpha=-1.0)  # R −= q·(qᵀR) in place (a rank-1 update, no temporary)
    return piv


class PivotedLowRankLinear(LowRankBase):
    def __init__(self, in_features, out_features, rank, bias=True, dtype=None, device=None):
        super().__init__(in_features, out_features, rank, dtype, device)
        kw = {"dtype": dtype, "device": device}
        self.w = nn.Parameter(torch.zeros(rank, in_features - rank, **kw))
        self.register_buffer("perm", torch.arange(in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.uniform_(self.u, -(1.0 / in_features) ** 0.5, (1.0 / in_features) ** 0.5)

    @classmethod
    def from_linear(cls, linear, rank=None, ratio=None, energy=None, calib=None, damping=1e-5, out_weight=None):
        """Factor a dense Linear like ``LowRankLinear.from_linear`` (plain or whitened SVD, same arguments),
        then store the factors pivoted. ``ratio`` counts the pivoted storage r·(out + in − r), so it gives a
        larger rank than the same ratio does for LowRankLinear."""
        u, v, weight = factor_linear(linear, rank, ratio, energy, calib, damping, out_weight,
                                     ratio_rank=_svd.pivoted_rank_for_ratio)
        return cls.from_factors(u, v, linear.bias, dtype=weight.dtype, device=weight.device)

    @classmethod
    def from_factors(cls, u, v, bias=None, dtype=None, device=None):
        """Build from factors u [out, r], v [r, in] of W = u @ v (pivoted here, exactly)."""
        check_factors(u, v)  # before the QR, which would fail less clearly
        up, w, perm = pivot_factors(u, v)
        return build_from_factors(cls, u, v, bias, dtype, device, {"u": up, "w": w, "perm": perm})

    def to_dense(self):
        """The effective dense weight [out, in] = u @ [I | w] @ P (layer's dtype, fp32 accumulation)."""
        acc = acc_dtype(self.u.dtype)
        return (self.u.to(acc) @ expand_right_factor(self.w, self.perm, acc)).to(self.u.dtype)

    def forward(self, x):
        return pivoted_lowrank_linear(x, self.u, self.w, self.perm, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, pivoted")


@torch.no_grad()
def to_balanced_lowrank(layer):
    """The LowRankLinear with the same weight as PivotedLowRankLinear `layer`, its factors balanced
    (``compress.svd.balance``): the form to train in. Pivoted factors are badly scaled for Adam (u' is
    small, w is O(1)); distilling them directly made SmolLM2 worse (docs/quality.md)."""
    u, v = _svd.balance(layer.u.double(), expand_right_factor(layer.w, layer.perm, torch.float64))
    return LowRankLinear.from_factors(u, v, layer.bias, dtype=layer.u.dtype, device=layer.u.device)


@torch.no_grad()
def to_pivoted(layer):
    """The PivotedLowRankLinear of LowRankLinear `layer`'s weight (exact; the inverse of to_balanced_lowrank)."""
    return PivotedLowRankLinear.from_factors(layer.u, layer.v, layer.bias, dtype=layer.u.dtype, device=layer.u.device)


def swap_layers(model, names, convert):
    """Replace the modules `names` of `model` by convert(module), in place, keeping the marks that
    compress() put on them (method, settings)."""
    from ..compress.pipeline import _set_module

    for name in names:
        old = model.get_submodule(name)
        new = convert(old)
        for attr in ("_reparam_method", "_reparam_settings"):
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
        _set_module(model, name, new)
