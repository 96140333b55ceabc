"""FactoredLinear: y = second(first(x)) — a combination layer, e.g. a low-rank
factorization whose two factors are themselves compressed layers (int4 …).

``first`` maps in_features → rank (it holds v [r, in]) and ``second`` maps
rank → out_features (it holds u [out, r] and the bias), so each factor runs
through its own kernel (e.g. two int4_linear calls for int4-quantized factors).
"""
from torch import nn


class FactoredLinear(nn.Module):
    CHILDREN = ("first", "second")  # constructor arguments that are layers (save_compressed records them)

    def __init__(self, first, second):
        super().__init__()
        if first.out_features != second.in_features:
            raise ValueError(f"`first` outputs {first.out_features} features but `second` takes {second.in_features}")
        self.first, self.second = first, second
        self.in_features, self.out_features = first.in_features, second.out_features
        self.rank = first.out_features

    @property
    def bias(self):
        return getattr(self.second, "bias", None)

    def to_dense(self):
        """Effective [out, in] weight = second.to_dense() @ first.to_dense()."""
        a, b = self.second.to_dense(), self.first.to_dense()
        return (a.float() @ b.float()).to(a.dtype)

    def forward(self, x):
        return self.second(self.first(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
