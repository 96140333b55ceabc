"""Tensorized Linear layers: the weight W [out, in] reshaped to a d-mode tensor
(out_modes + in_modes, e.g. [o₁, o₂, i₁, i₂] with o₁·o₂ = out, i₁·i₂ = in;
d = 3 or 4 typically) and stored as CP or Tucker factors.

* ``CPLinear``: W = Σ_r a¹_r ∘ … ∘ a^d_r, factors ``factors[n]`` [I_n, R];
  parameters R·Σ I_n.
* ``TuckerLinear``: W = G ×₁ U₁ … ×_d U_d, core ``core`` [r_1…r_d],
  factors ``factors[n]`` [I_n, r_n]; parameters Π r_n + Σ I_n·r_n.

Forward never forms W: x [..., in] is reshaped to [M, i₁, i₂, …], contracted
with the input-mode factors (down to R, or to the input ranks), then with the
core (Tucker) and the output-mode factors (torch.einsum, which orders the
pairwise contractions). Plain PyTorch, so training works through autograd.
``from_linear`` decomposes the dense weight (CP-ALS, or HOSVD + HOOI,
compress/tensor_decomp.py) and records ``projection_error``.
"""
import math
import string

import torch
from torch import nn

from .._linear import linear_from
from ..compress import tensor_decomp as td


def split_features(n, parts=2):
    """n as a product of `parts` factors as equal as possible (largest first), e.g. 1536 -> (48, 32)."""
    if parts == 1:
        return (n,)
    best = None
    for a in range(1, n + 1):
        if n % a == 0:
            rest = split_features(n // a, parts - 1)
            cand = tuple(sorted((a,) + rest, reverse=True))
            if best is None or max(cand) / min(cand) < max(best) / min(best):
                best = cand
        if a * a > n and best is not None and parts == 2:
            break
    return best


def _modes(name, modes, features):
    if modes is None:
        return split_features(features, 2)
    modes = tuple(modes)
    if not modes or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes) or math.prod(modes) != features:
        raise ValueError(f"`{name}` must be positive ints whose product is {features}, got {modes!r}")
    return modes


class _Tensorized(nn.Module):
    def _setup_modes(self, in_features, out_features, in_modes, out_modes):
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"`{name}` must be a positive int, got {val!r}")
        self.in_features, self.out_features = in_features, out_features
        self.in_modes = _modes("in_modes", in_modes, in_features)
        self.out_modes = _modes("out_modes", out_modes, out_features)
        if len(self.in_modes) + len(self.out_modes) < 3:
            raise ValueError("`in_modes` + `out_modes` must give at least 3 modes (e.g. out_modes=(out,), in_modes=(i1, i2))")
        self.shape = self.out_modes + self.in_modes
        self.projection_error = None

    def _init_bias(self, bias, dtype, device):
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device)) if bias else None
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _letters(self):
        d_out, d = len(self.out_modes), len(self.shape)
        letters = string.ascii_letters[:d]
        return letters[:d_out], letters[d_out:]

    def _finish(self, y, x):
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _check_x(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"`x` has {x.shape[-1]} features in its last dimension, expected {self.in_features}")

    def to_linear(self):
        return linear_from(self.to_dense().detach(), self.bias)


def _weight_tensor(linear, out_modes, in_modes):
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"`linear` must be an nn.Linear-like module with a 2-D weight, got {type(linear).__name__}")
    n, k = weight.shape
    out_modes = _modes("out_modes", out_modes, n)
    in_modes = _modes("in_modes", in_modes, k)
    return weight, out_modes, in_modes, weight.detach().double().reshape(out_modes + in_modes)


class CPLinear(_Tensorized):
    def __init__(self, in_features, out_features, rank, in_modes=None, out_modes=None, bias=True, dtype=None, device=None):
        super().__init__()
        self._setup_modes(in_features, out_features, in_modes, out_modes)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`rank` must be a positive int, got {rank!r}")
        self.rank = rank
        dtype = dtype or torch.get_default_dtype()
        # each entry of W is a sum of R products of d factors: scale so W ~ U(±1/√in)
        std = (1.0 / (math.sqrt(in_features) * math.sqrt(rank))) ** (1.0 / len(self.shape))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(s, rank, dtype=dtype, device=device) * std) for s in self.shape])
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_linear(cls, linear, rank, in_modes=None, out_modes=None, max_iter=200):
        weight, out_modes, in_modes, t = _weight_tensor(linear, out_modes, in_modes)
        fit = td.cp_als(t, rank, max_iter=max_iter)
        layer = cls(weight.shape[1], weight.shape[0], rank, in_modes, out_modes, bias=linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            for p, f in zip(layer.factors, fit.factors):
                p.copy_(f)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.projection_error = fit.rel_error
        return layer

    def to_dense(self):
        return td.cp_to_tensor([f.detach() for f in self.factors]).reshape(self.out_features, self.in_features)

    def forward(self, x):
        self._check_x(x)
        outs, ins = self._letters()
        xs = x.reshape(-1, *self.in_modes).to(self.factors[0].dtype)
        d_out = len(self.out_modes)
        # operands in contraction order (input modes first): no intermediate larger than [M, in] or [M, out]
        operands = [xs] + list(self.factors)[d_out:] + list(self.factors)[:d_out]
        spec = "Z" + ins + "," + ",".join(c + "Y" for c in ins + outs) + "->Z" + outs
        return self._finish(torch.einsum(spec, *operands), x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, modes={self.shape}"


class TuckerLinear(_Tensorized):
    def __init__(self, in_features, out_features, ranks, in_modes=None, out_modes=None, bias=True, dtype=None, device=None):
        super().__init__()
        self._setup_modes(in_features, out_features, in_modes, out_modes)
        self.ranks = td._check_ranks(self.shape, ranks)
        dtype = dtype or torch.get_default_dtype()
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.linalg.qr(torch.randn(s, r, dtype=torch.float64, device="cpu"))[0].to(dtype=dtype, device=device))
             for s, r in zip(self.shape, self.ranks)])
        # orthonormal factors: W has the core's Frobenius norm; match nn.Linear's (≈ √(out/3))
        std = math.sqrt(out_features / 3.0 / math.prod(self.ranks))
        self.core = nn.Parameter(torch.randn(*self.ranks, dtype=dtype, device=device) * std)
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_linear(cls, linear, ranks, in_modes=None, out_modes=None, max_iter=50):
        weight, out_modes, in_modes, t = _weight_tensor(linear, out_modes, in_modes)
        fit = td.tucker_hooi(t, ranks, max_iter=max_iter)
        layer = cls(weight.shape[1], weight.shape[0], fit.ranks, in_modes, out_modes, bias=linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.core.copy_(fit.core)
            for p, f in zip(layer.factors, fit.factors):
                p.copy_(f)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.projection_error = fit.rel_error
        return layer

    def to_dense(self):
        return td.tucker_to_tensor(self.core.detach(), [f.detach() for f in self.factors]).reshape(
            self.out_features, self.in_features)

    def forward(self, x):
        self._check_x(x)
        outs, ins = self._letters()
        ranks = string.ascii_letters[len(self.shape):2 * len(self.shape)]
        xs = x.reshape(-1, *self.in_modes).to(self.core.dtype)
        d_out = len(self.out_modes)
        # contraction order: input factors, core, output factors
        spec = ("Z" + ins + "," + ",".join(c + r for c, r in zip(ins, ranks[d_out:])) + "," + ranks + ","
                + ",".join(c + r for c, r in zip(outs, ranks[:d_out])) + "->Z" + outs)
        factors = list(self.factors)
        return self._finish(torch.einsum(spec, xs, *factors[d_out:], self.core, *factors[:d_out]), x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, modes={self.shape}"
