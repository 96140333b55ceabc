"""CorrectedLinear: y = base(x) + correction(x) — a compressed layer plus a low-rank
correction of its error (in the manner of LQER / ZeroQuant-V2's LoRC).

``base`` is any compressed layer with ``to_dense()`` (int4, int8, lookup-table …) and holds
the bias; ``correction`` is a bias-free ``LowRankLinear`` fitted to the residual
W − base.to_dense(), whitened by the layer's inputs when calibration data is given, so
that it removes the part of the error the inputs see most. Each part runs through its own
kernel (e.g. ``int4_linear`` then ``lowrank_linear``: r·(in + out) more weights to read).

The correction is trainable: ``distill`` fine-tunes its factors (and the base's float
scales) while the integer codes stay frozen, as QLoRA adapters do on a 4-bit model.
"""
from torch import nn

from .lowrank import LowRankLinear, factor_linear
from .._dtypes import acc_dtype


class _Residual:
    """A Linear-like stand-in holding the residual weight (no bias) for the SVD."""

    def __init__(self, weight):
        self.weight, self.bias = weight, None


class CorrectedLinear(nn.Module):
    CHILDREN = ("base", "correction")  # constructor arguments that are layers (save_compressed records them)

    def __init__(self, base, correction):
        super().__init__()
        if not isinstance(correction, LowRankLinear):
            raise ValueError(f"`correction` must be a LowRankLinear, got {type(correction).__name__}")
        if correction.bias is not None:
            raise ValueError("`correction` must have no bias (the base layer holds it)")
        shapes = (base.in_features, base.out_features), (correction.in_features, correction.out_features)
        if shapes[0] != shapes[1]:
            raise ValueError(f"`base` maps {shapes[0][0]} → {shapes[0][1]} features but `correction` "
                             f"{shapes[1][0]} → {shapes[1][1]}")
        self.base, self.correction = base, correction
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = correction.rank

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    @classmethod
    def from_linear(cls, linear, base, rank, calib=None, out_weight=None, damping=1e-5):
        """`base` (already built from `linear`) plus the rank-`rank` correction of W − base.to_dense().

        calib: the layer's inputs [n, in] or a ``CalibStats``; given, the correction minimizes the
        output error on them (whitened SVD) instead of the weight error; out_weight: with calib,
        per-output-channel weights of that error (√Fisher: a loss estimate)."""
        w = linear.weight.detach()
        acc = acc_dtype(w.dtype)
        residual = w.to(acc) - base.to_dense().detach().to(w.device, acc)
        u, v, _ = factor_linear(_Residual(residual), rank=rank, calib=calib, damping=damping, out_weight=out_weight)
        return cls(base, LowRankLinear.from_factors(u, v, None, dtype=w.dtype, device=w.device))

    def to_dense(self):
        """The effective [out, in] weight: base.to_dense() + u @ v (summed in fp32, or fp64 for fp64 layers)."""
        a = self.base.to_dense()
        acc = acc_dtype(a.dtype)
        return (a.to(acc) + self.correction.to_dense().to(acc)).to(a.dtype)

    def forward(self, x):
        return self.base(x) + self.correction(x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
