"""Low displacement rank (Toeplitz-like) approximation of a square weight.

Displacement operator ∇(M) = Z₁·M − M·Z₋₁, with Z_f the f-circulant shift
(ones on the sub-diagonal, f in the top-right corner). Z₁ and Z₋₁ have
disjoint spectra (n-th roots of 1 and of −1), so ∇ is invertible, and
(Pan; Sindhwani et al. 2015)

    ∇(M) = G·Hᵀ  ⇔  M = ½ · Σ_k Z₁(g_k) · Z₋₁(J·h_k),

where Z_f(v) is the f-circulant matrix with first column v and J reverses
the order. A Toeplitz matrix has displacement rank ≤ 2; we approximate W by
the matrix whose displacement is the rank-r truncated SVD of ∇(W)
(G = U_r·√Σ_r, H = V_r·√Σ_r). This is not the Frobenius-nearest matrix of
displacement rank r (no closed form exists) but is exact for a W of
displacement rank ≤ r and improves with r (r = n gives W back).

A rectangular N×K weight is zero-padded to n = max(N, K); the matvec then
pads x and drops extra outputs.

Matvec (x [..., n]) with r circulant · skew-circulant products, O(r·n log n):
Z₋₁(u)·x = D⁻¹·circ(D·u)·(D·x) with D = diag(η^k), η = e^{iπ/n}; then the
circulant Z₁(g) is applied with real FFTs.
"""
import math
from dataclasses import dataclass

import torch

from .structured import _check_weight, relative_error
from .._dtypes import acc_dtype


def shift_matrix(n, f, dtype=torch.float64, device=None):
    """Z_f: Z_f·e_i = e_{i+1}, Z_f·e_{n−1} = f·e_0."""
    z = torch.zeros(n, n, dtype=dtype, device=device)
    z[1:, :-1] = torch.eye(n - 1, dtype=dtype, device=device)
    z[0, -1] = f
    return z


def displacement(m):
    """∇(M) = Z₁·M − M·Z₋₁, computed by index shifts (no dense shift matrices)."""
    z1m = torch.roll(m, 1, dims=0)             # (Z₁ M)[i] = M[i − 1 mod n]
    mz = torch.roll(m, -1, dims=1).clone()     # (M Z₋₁)[:, j] = M[:, j + 1], last column −M[:, 0]
    mz[:, -1] = -m[:, 0]
    return z1m - mz


@dataclass
class LDRFit:
    g: torch.Tensor  # [n, r] (float64)
    h: torch.Tensor  # [n, r]
    out_features: int
    in_features: int
    rel_error: float

    @property
    def rank(self):
        return self.g.shape[1]

    def to_dense(self):
        return ldr_to_dense(self.g, self.h)[:self.out_features, :self.in_features]


def ldr_approximate(weight, rank):
    """Rank-`rank` displacement approximation of W (padded to square); reports the relative error."""
    _check_weight(weight)
    n_out, n_in = weight.shape
    n = max(n_out, n_in)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"`rank` must be an int with 1 <= rank <= max(out, in) = {n}, got {rank!r}")
    w = weight.detach().to(torch.float64)
    padded = w.new_zeros(n, n)
    padded[:n_out, :n_in] = w
    u, s, vh = torch.linalg.svd(displacement(padded))
    root = s[:rank].sqrt()
    g = u[:, :rank] * root
    h = vh[:rank].t() * root
    approx = ldr_to_dense(g, h)[:n_out, :n_in]
    return LDRFit(g, h, n_out, n_in, relative_error(weight, approx))


def _fcirculant(v, f):
    """Dense f-circulant with first column v: column j = Z_f^j · v."""
    n = v.shape[0]
    i = torch.arange(n, device=v.device)
    diff = i[:, None] - i[None, :]
    m = v[diff % n]
    return torch.where(diff < 0, f * m, m)


def ldr_to_dense(g, h):
    """M = ½ Σ_k Z₁(g_k) · Z₋₁(J h_k)."""
    out = g.new_zeros(g.shape[0], g.shape[0])
    for k in range(g.shape[1]):
        out = out + _fcirculant(g[:, k], 1.0) @ _fcirculant(h[:, k].flip(0), -1.0)
    return 0.5 * out


def ldr_matvec(x, g, h):
    """y = M·x for M of generators (g, h) [n, r]; x [..., n], computed in x's dtype (≥ fp32)."""
    n, r = g.shape
    dt = acc_dtype(x.dtype)
    cdt = torch.complex128 if dt == torch.float64 else torch.complex64
    xs = x.to(dt)
    k = torch.arange(n, device=x.device, dtype=dt)
    d = torch.polar(torch.ones_like(k), k * (math.pi / n)).to(cdt)  # D = diag(η^k)
    u = h.to(dt).flip(0)                                               # J h  [n, r]
    # skew-circulant products for all r terms at once: D⁻¹ ifft(fft(D u_k) · fft(D x))
    fx = torch.fft.fft(xs.to(cdt) * d, dim=-1)                         # [..., n]
    fu = torch.fft.fft(u.t().to(cdt) * d, dim=-1)                      # [r, n]
    z = torch.fft.ifft(fx.unsqueeze(-2) * fu, dim=-1) * d.conj()       # [..., r, n]
    z = z.real
    # circulant products Z₁(g_k)·z_k, summed over k in the frequency domain
    fg = torch.fft.rfft(g.to(dt).t(), dim=-1)                          # [r, n//2+1]
    y = torch.fft.irfft((torch.fft.rfft(z, dim=-1) * fg).sum(-2), n=n, dim=-1)
    return 0.5 * y
