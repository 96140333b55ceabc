"""Truncated SVD of a dense weight, plain and activation-aware (whitened).

Both return factors ``u`` [out, r] and ``v`` [r, in] with ``W ≈ u @ v``, split
as ``u = U_r·sqrt(Σ_r)``, ``v = sqrt(Σ_r)·V_rᵀ`` so the two factors have equal
scale (better conditioned for fp16 kernels, int4 factor quantization and
distillation than putting all of Σ on one side).

Rank selection (exactly one of):

* ``rank``   — the rank itself, 1 ≤ rank ≤ min(out, in).
* ``ratio``  — the fraction of the dense layer's weight parameters to REMOVE,
  0 < ratio < 1 (as in SVD-LLM's "compression ratio"): ``ratio=0.2`` keeps
  r·(out+in) ≤ 0.8·out·in parameters.
* ``energy`` — the fraction of spectral energy Σσ² to keep, 0 < energy ≤ 1;
  for whitened SVD it is the energy of W·S, i.e. of the outputs on the
  calibration data.

Whitened SVD (SVD-LLM): with calibration inputs X [n, in] of the layer and
G = XᵀX = S·Sᵀ (Cholesky), ‖X·(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)·S‖_F, so truncating
the SVD of W·S minimizes the layer's OUTPUT error on the calibration inputs,
not the weight error. The factors map back with ``v = sqrt(Σ)·V_rᵀ·S⁻¹``.
Factorization runs in float64 (Cholesky of near-singular Gram matrices in
fp32 is unreliable), on the weight's GPU when it is on one, else on the CPU
(``factor_device``); the factors are returned in float32 (float64 for a float64
weight) on that device.
"""
import contextlib
import math
import os

import torch

from .._dtypes import acc_dtype

FACTOR_DTYPE = torch.float64


def factor_device(weight):
    """Where a weight's factorizations run: its GPU if it is on one, else the CPU.

    A whitened SVD of an 8B model's down projection (4096 × 14336) is ~4 TFLOP of float64 (W·S,
    the Cholesky, the eigh, the triangular solve): ~2 min on one CPU core, seconds (predicted; not
    yet timed) on an H100/H200 (~60 TFLOP/s float64). ``REPARAM_FACTOR_DEVICE=cpu`` keeps them on
    the CPU (GPUs with slow float64 — consumer and L40S parts run it at 1/64 rate — may prefer that)."""
    if weight.device.type == "cuda" and os.environ.get("REPARAM_FACTOR_DEVICE", "").lower() != "cpu":
        return weight.device
    return torch.device("cpu")


@contextlib.contextmanager
def full_precision_matmuls():
    """Context (or decorator): float32 matmuls in full float32, not TF32, while compressing. A user's
    ``torch.set_float32_matmul_precision("high")`` is right for inference but gives the Gram matrices,
    GPTQ's error updates and the reported errors ~1e-3 relative noise on a GPU."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _bad(name, message):
    raise ValueError(f"`{name}`: {message}")


def rank_for_ratio(out_features, in_features, ratio):
    """Largest rank whose factors hold at most (1 − ratio) of out·in parameters (at least 1)."""
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        _bad("ratio", f"must be a number with 0 < ratio < 1 (fraction of parameters removed), got {ratio!r}")
    budget = (1.0 - float(ratio)) * out_features * in_features
    r = int(math.floor(budget / (out_features + in_features) + 1e-9))
    return max(1, min(r, min(out_features, in_features)))


def pivoted_rank_for_ratio(out_features, in_features, ratio):
    """Largest rank r whose pivoted storage r·(out + in − r) (nn.PivotedLowRankLinear) holds at most
    (1 − ratio) of out·in parameters (at least 1): the smaller root of r² − (out + in)·r + budget."""
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        _bad("ratio", f"must be a number with 0 < ratio < 1 (fraction of parameters removed), got {ratio!r}")
    budget = (1.0 - float(ratio)) * out_features * in_features
    s = out_features + in_features
    r = int(math.floor((s - math.sqrt(max(s * s - 4.0 * budget, 0.0))) / 2 + 1e-9))
    while r > 1 and r * (s - r) > budget:  # guard the float root
        r -= 1
    return max(1, min(r, min(out_features, in_features) - 1))


def rank_for_energy(singular_values, energy):
    """Smallest rank keeping at least `energy` of Σσ²."""
    if not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
        _bad("energy", f"must be a number with 0 < energy <= 1 (fraction of Σσ² kept), got {energy!r}")
    e = singular_values.double() ** 2
    total = e.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(float(energy), dtype=cum.dtype, device=cum.device) - 1e-12).item()) + 1
    return max(1, min(r, singular_values.numel()))


def select_rank(out_features, in_features, singular_values=None, rank=None, ratio=None, energy=None):
    """Resolve exactly one of rank / ratio / energy to a rank."""
    given = [n for n, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        _bad("rank", f"give exactly one of `rank`, `ratio`, `energy`; got {given or 'none'}")
    full = min(out_features, in_features)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            _bad("rank", f"must be an int with 1 <= rank <= min(out, in) = {full}, got {rank!r}")
        return rank
    if ratio is not None:
        return rank_for_ratio(out_features, in_features, ratio)
    if singular_values is None:
        _bad("energy", "energy-based selection needs the singular values")
    return rank_for_energy(singular_values, energy)


def _check_weight(weight):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        _bad("weight", f"must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight))}")
    if not torch.isfinite(weight).all():
        _bad("weight", "contains NaN or Inf")


@contextlib.contextmanager
def _one_thread():
    """LAPACK (MKL) with several threads on a busy machine can be 10× slower than one thread
    (measured: fp64 eigh of 576² 9 s vs 0.6 s); factorizations are small, so use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def thin_svd(A):
    """(U, σ, Vh) of A [m, n] in float64, σ descending, via eigh of the smaller Gram matrix.

    3× faster than LAPACK's SVD here and accurate for every σ_i ≫ √eps·σ_1 — the
    singular values a truncation keeps; the tail (which it drops) may be inexact.
    """
    A = A.to(FACTOR_DTYPE)
    m, n = A.shape
    with _one_thread():
        if m <= n:
            lam, U = torch.linalg.eigh(A @ A.t())
            lam, U = lam.flip(0), U.flip(1)
            sig = lam.clamp_min(0).sqrt()
            inv = torch.where(sig > sig[0] * 1e-13, 1.0 / sig, torch.zeros_like(sig))
            Vh = (U.t() @ A) * inv[:, None]
        else:
            lam, V = torch.linalg.eigh(A.t() @ A)
            lam, V = lam.flip(0), V.flip(1)
            sig = lam.clamp_min(0).sqrt()
            inv = torch.where(sig > sig[0] * 1e-13, 1.0 / sig, torch.zeros_like(sig))
            U = (A @ V) * inv[None, :]
            Vh = V.t()
    return U, sig, Vh


def _split(U, S, Vh, r):
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def truncated_svd(weight, rank=None, ratio=None, energy=None):
    """Plain truncated SVD: best rank-r approximation of W in Frobenius norm.

    Returns (u [out, r], v [r, in], singular_values) in float32.
    """
    _check_weight(weight)
    W = weight.detach().to(factor_device(weight), FACTOR_DTYPE)
    U, S, Vh = thin_svd(W)
    r = select_rank(*W.shape, singular_values=S, rank=rank, ratio=ratio, energy=energy)
    u, v = _split(U, S, Vh, r)
    dt = acc_dtype(weight.dtype)
    return u.to(dt), v.to(dt), S.to(dt)


def gram_of(calib, in_features, device="cpu"):
    """XᵀX in float64 on `device` from calibration inputs [..., in] (or a ready Gram matrix wrapper)."""
    from .calib import CalibStats  # local: calib imports factor_device from here

    if isinstance(calib, CalibStats):
        if calib.in_features != in_features:
            _bad("calib", f"statistics are for {calib.in_features} input features, the layer has {in_features}")
        if calib.count == 0:
            _bad("calib", "statistics hold no samples")
        return calib.gram.to(device)
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[-1] != in_features:
        _bad("calib", f"must be a tensor [n, in_features={in_features}] of the layer's inputs or CalibStats, "
                      f"got {getattr(calib, 'shape', type(calib))}")
    X = calib.detach().reshape(-1, in_features).to(device, FACTOR_DTYPE)
    if not torch.isfinite(X).all():
        _bad("calib", "contains NaN or Inf")
    return X.t() @ X


def whitening_factor(gram, damping=1e-5, max_tries=8):
    """Lower-triangular S with S·Sᵀ = G + λ·mean(diag G)·I.

    The damping λ makes S invertible when X is rank-deficient (n < in, dead
    channels); it grows ×10 until the Cholesky factorization succeeds.
    """
    G = gram.to(FACTOR_DTYPE)
    k = G.shape[0]
    scale = G.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    lam = float(damping)
    for _ in range(max_tries):
        S, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
        if int(info) == 0:
            return S
        lam = max(lam * 10.0, 1e-10)
    _bad("calib", "Gram matrix XᵀX is not positive definite even with damping; check the calibration inputs")


def whitened_svd(weight, calib, rank=None, ratio=None, energy=None, damping=1e-5, out_weight=None):
    """Activation-aware truncated SVD (SVD-LLM): minimizes ‖X·(W − u·v)ᵀ‖_F.

    calib: the layer's inputs X [n, in] (any leading dims) or a CalibStats.
    out_weight: optional positive weights d [out] of the output channels; then
    ‖X·(W − u·v)ᵀ·diag(d)‖_F is minimized (SVD of diag(d)·W·S) — with
    d = √Fisher (``fisher.channel_weights``) that is the loss-increase estimate.
    Returns (u [out, r], v [r, in], singular values of [diag(d)·]W·S) in float32.
    """
    _check_weight(weight)
    W = weight.detach().to(factor_device(weight), FACTOR_DTYPE)
    d = _check_out_weight(out_weight, W.shape[0], W.device)
    with _one_thread():
        S = whitening_factor(gram_of(calib, W.shape[1], W.device), damping)
    U, sig, Vh = thin_svd(W @ S if d is None else d[:, None] * (W @ S))
    r = select_rank(*W.shape, singular_values=sig, rank=rank, ratio=ratio, energy=energy)
    u, vs = _split(U, sig, Vh, r)
    if d is not None:
        u = u / d[:, None]
    # v·S = vs  ⇔  Sᵀ·vᵀ = vsᵀ, Sᵀ upper triangular.
    with _one_thread():
        v = torch.linalg.solve_triangular(S.t(), vs.t(), upper=True).t()
        u, v = balance(u, v)
    dt = acc_dtype(weight.dtype)
    return u.to(dt), v.to(dt), sig.to(dt)


def whitened_spectrum(weight, gram, out_weight=None, damping=1e-5):
    """σ² of [diag(out_weight)·]W·S (the matrix ``whitened_svd`` factors), descending, via the smaller Gram."""
    W = weight.detach().to(factor_device(weight), FACTOR_DTYPE)
    d = _check_out_weight(out_weight, W.shape[0], W.device)
    if d is not None:
        W = d[:, None] * W
    with _one_thread():
        A = W @ whitening_factor(gram.to(W.device), damping)
        lam = torch.linalg.eigvalsh(A @ A.t() if A.shape[0] <= A.shape[1] else A.t() @ A)
    return lam.flip(0).clamp_min(0)


def _check_out_weight(out_weight, out_features, device):
    if out_weight is None:
        return None
    d = torch.as_tensor(out_weight).detach().to(device, FACTOR_DTYPE)
    if d.shape != (out_features,) or not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
        _bad("out_weight", f"must be {out_features} finite positive channel weights, got "
                           f"{tuple(d.shape)} (min {float(d.min()) if d.numel() else 'n/a'})")
    return d


def balance(u, v):
    """The same product u·v split as P·√Λ, √Λ·Qᵀ from its own SVD (P, Q orthonormal).

    Whitening (S⁻¹ in v) and output weighting (D⁻¹ in u) leave factors whose rows differ in scale by
    orders of magnitude, within a layer and between layers. Adam moves every parameter by about the same
    step, so distilling such factors wrecks the small ones (measured: SmolLM2 27.2 → 29.0 perplexity
    after 120 steps); int4 groups suffer too. Costs two thin QRs and an r×r SVD.
    """
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v.t())
    a, lam, bh = torch.linalg.svd(ru @ rv.t())
    root = lam.sqrt()
    return (qu @ a) * root, root[:, None] * (bh @ qv.t())


def output_error(weight, approx, gram):
    """Relative output error ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ computed from G = XᵀX alone."""
    # float32 is plenty for a reported error and twice as fast as float64 on the CPU; on a GPU float64
    # (fast there, and safe from TF32 matmuls where a user allowed them)
    dev = factor_device(weight)
    dt = torch.float32 if dev.type == "cpu" else torch.float64
    W = weight.detach().to(dev, dt)
    E = W - approx.detach().to(dev, dt)
    G = gram.to(dev, dt)
    num = ((E @ G) * E).sum().double().clamp_min(0)
    den = ((W @ G) * W).sum().double().clamp_min(1e-300)
    return float((num / den).sqrt())


def weight_error(weight, approx):
    """Relative weight error ‖W − Ŵ‖_F / ‖W‖_F."""
    dev = factor_device(weight)
    W = weight.detach().to(dev, FACTOR_DTYPE)
    return float(torch.linalg.norm(W - approx.detach().to(dev, FACTOR_DTYPE)) / torch.linalg.norm(W).clamp_min(1e-300))
