"""GPTQ onto lookup tables: the log and per-row VQ formats (``LUTLinear``) calibrated on the layer's inputs.

Round to nearest picks, for each weight, the nearest entry of its row's table (16 entries at 4 bits:
``scale·log_levels`` for log, k-means centroids for VQ). GPTQ (``gptq.py``) instead takes the columns
one by one and spreads each column's rounding error over the columns not yet quantized, so the layer's
output error ‖X·(W − Ŵ)ᵀ‖² on the calibration inputs is what shrinks — the same column loop as int4's
GPTQ with "nearest table entry" as the rounding (the idea of GPTVQ and SqueezeLLM's non-uniform grids).

The tables come first (weighted by each input's energy, the diagonal of H = XᵀX), then GPTQ chooses
the codes, then ``refit_tables`` solves for the entries that minimize the output error given those codes
(least squares: for each table, (Σ Mᵀ H M)·t = Σ Mᵀ H w with M the one-hot of a row's codes); log's
tables have one free number per row, the scale, refitted the same way (``refit_scales``).
"""
import torch

from .gptq import check_gptq_args, drop_dead_inputs, inverse_hessian_factor, propagate, single_threaded


def _check(w, hessian, tables, rows_per_table, damp=0.0):
    check_gptq_args(w, hessian, damp)
    n = w.shape[0]
    if not isinstance(rows_per_table, int) or rows_per_table < 1 or n % rows_per_table:
        raise ValueError(f"`rows_per_table` must be a positive int dividing out_features = {n}, got {rows_per_table!r}")
    if not isinstance(tables, torch.Tensor) or tables.dim() != 2 or tables.shape[0] * rows_per_table != n:
        raise ValueError(f"`tables` must be [out_features / rows_per_table, entries] = [{n // rows_per_table}, E], "
                         f"got {tuple(getattr(tables, 'shape', ())) or type(tables).__name__}")


@torch.no_grad()
def gptq_table(w, hessian, tables, rows_per_table=1, damp=0.01, block_size=128, act_order=True):
    """Codes [N, K] (int64) of ``w`` [N, K] into ``tables`` [L, E] (row n uses table n // rows_per_table) by GPTQ
    with ``hessian`` = XᵀX [K, K]: columns in order of decreasing input energy when act_order, each rounded to
    its row's nearest entry, its error spread over the later columns. Runs in float64 on w's device."""
    _check(w, hessian, tables, rows_per_table, damp)
    n, k = w.shape
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    drop_dead_inputs(W, H)
    T = tables.detach().to(W.device, torch.float64).repeat_interleave(rows_per_table, 0)  # [N, E]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)
    codes = torch.empty(n, k, dtype=torch.long, device=W.device)

    def quantize_column(c, W1, i):
        idx = (W1[:, i, None] - T).abs().argmin(1)
        codes[:, c] = idx
        return T.gather(1, idx[:, None])[:, 0]

    with single_threaded(W.device):
        propagate(W, Hinv, block_size, quantize_column)
    if perm is None:
        return codes
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


@torch.no_grad()
def refit_tables(w, hessian, codes, tables, rows_per_table=1, ridge=1e-6):
    """Tables [L, E] minimizing Σ_n (w_n − t[codes_n])ᵀ·H·(w_n − t[codes_n]) over the rows for the given codes
    (float64 on w's device). An entry no code uses keeps its value from ``tables`` (a ridge of
    ``ridge``·mean(diag H) pulls every entry toward it, which also keeps the solve well posed)."""
    _check(w, hessian, tables, rows_per_table)
    n, k = w.shape
    nt, e = tables.shape
    dev = w.device
    H = hessian.detach().to(dev, torch.float64)
    W = w.detach().to(dev, torch.float64)
    A = torch.zeros(nt, e, e, dtype=torch.float64, device=dev)  # Σ over a table's rows of Mᵀ·H·M
    b = torch.zeros(nt, e, dtype=torch.float64, device=dev)     # Σ of Mᵀ·H·w
    table_of = torch.arange(n, device=dev) // rows_per_table
    chunk = max(1, (1 << 24) // (k * e))  # rows at a time: bounds the one-hots [rows, K, E]
    for r0 in range(0, n, chunk):
        M = torch.nn.functional.one_hot(codes[r0:r0 + chunk].to(dev), e).to(torch.float64)  # [c, K, E]
        c = M.shape[0]
        HM = (H @ M.permute(1, 0, 2).reshape(k, c * e)).reshape(k, c, e).permute(1, 0, 2)  # [c, K, E]
        A.index_add_(0, table_of[r0:r0 + c], M.transpose(1, 2) @ HM)
        b.index_add_(0, table_of[r0:r0 + c], torch.einsum("cke,ck->ce", HM, W[r0:r0 + c]))
    lam = ridge * float(torch.diag(H).mean().clamp_min(1e-30)) * rows_per_table
    old = tables.detach().to(dev, torch.float64)
    A = A + lam * torch.eye(e, dtype=torch.float64, device=dev)
    return torch.linalg.solve(A, b + lam * old)


@torch.no_grad()
def refit_scales(w, hessian, unit_values):
    """Per-row scales s [N] minimizing Σ_n (w_n − s_n·z_n)ᵀ·H·(w_n − s_n·z_n), z = ``unit_values`` [N, K] (the
    codes' values at scale 1: log_levels[codes]); float64 on w's device. A row of zeros keeps scale 1."""
    dev = w.device
    H = hessian.detach().to(dev, torch.float64)
    Z = unit_values.detach().to(dev, torch.float64)
    HZ = Z @ H
    num = (HZ * w.detach().to(dev, torch.float64)).sum(1)
    den = (HZ * Z).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))


def _alternate(w, hessian, rounds, state, codes_for, refit, decode):
    """`rounds` of codes = codes_for(state), then state = refit(codes, state); returns (codes, state) of the round whose
    output error tr((W − Ŵ)·H·(W − Ŵ)ᵀ), Ŵ = decode(codes, state), is smallest (the last one when rounds = 1)."""
    best = None
    for _ in range(rounds):
        codes = codes_for(state)
        state = refit(codes, state)
        if rounds == 1:
            return codes, state
        d = w.detach().to(torch.float64) - decode(codes, state)
        err = float(((d @ hessian.to(d.device, torch.float64)) * d).sum())
        if best is None or err < best[0]:
            best = (err, codes, state)
    return best[1], best[2]


def gptq_vq(w, hessian, tables, rows_per_table=1, rounds=1, damp=0.01, act_order=True):
    """(codes [N, K] int64, tables [L, E] float64): `rounds` of GPTQ codes then refitted tables, starting from
    ``tables`` (k-means on the weights); the round whose output error on H is smallest."""
    return _alternate(
        w, hessian, rounds, tables.to(w.device, torch.float64),
        lambda t: gptq_table(w, hessian, t, rows_per_table, damp, act_order=act_order),
        lambda codes, t: refit_tables(w, hessian, codes, t, rows_per_table),
        lambda codes, t: t.repeat_interleave(rows_per_table, 0).gather(1, codes))


def gptq_log(w, hessian, scale, levels, rounds=1, damp=0.01, act_order=True):
    """(codes [N, K] int64, scale [N] float64) of log quantization (table of row n = scale_n·levels): `rounds`
    of GPTQ codes then least-squares scales, starting from ``scale``; the round with the smallest output error."""
    levels = levels.to(w.device, torch.float64)
    return _alternate(
        w, hessian, rounds, scale.to(w.device, torch.float64),
        lambda s: gptq_table(w, hessian, s[:, None] * levels[None, :], 1, damp, act_order=act_order),
        lambda codes, _: refit_scales(w, hessian, levels[codes]),
        lambda codes, s: s[:, None] * levels[codes])
