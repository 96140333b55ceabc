"""GPTQ onto lookup tables: the log and VQ formats (``LUTLinear``) calibrated on the layer's inputs.

Round to nearest picks, for each weight, the nearest entry of its row's table (16 entries at 4 bits:
``scale·log_levels`` for log, k-means centroids for VQ). GPTQ (``gptq.py``) instead takes the columns
one by one and spreads each column's rounding error over the columns not yet quantized, so the layer's
output error ‖X·(W − Ŵ)ᵀ‖² on the calibration inputs is what shrinks — the same column loop as int4's
GPTQ with "nearest table entry" as the rounding (the idea of GPTVQ and SqueezeLLM's non-uniform grids).

The tables come first (weighted by each input's energy, the diagonal of H = XᵀX), then GPTQ chooses
the codes, then ``refit_tables`` solves for the entries that minimize the output error given those codes
(least squares: for each table, (Σ Mᵀ H M)·t = Σ Mᵀ H w with M the one-hot of a row's codes); log's
tables have one free number per row, the scale, refitted the same way (``refit_scales``).

VQ with d > 1 (GPTVQ, van Baalen et al. 2024): a code stands for d consecutive inputs, so the loop rounds a
whole sub-vector at its first column, to the codebook vector nearest in the metric of the output error
(``_nearest_vector``), and act order moves whole sub-vectors.
"""
import torch

from .gptq import check_gptq_args, drop_dead_inputs, inverse_hessian_factor, propagate, single_threaded
from .vq import nearest_centroids, vq_dequantize


def _check(w, hessian, tables, rows_per_table, damp=0.0):
    check_gptq_args(w, hessian, damp)
    n, k = w.shape
    if not isinstance(rows_per_table, int) or rows_per_table < 1 or n % rows_per_table:
        raise ValueError(f"`rows_per_table` must be a positive int dividing out_features = {n}, got {rows_per_table!r}")
    if not isinstance(tables, torch.Tensor) or tables.dim() not in (2, 3) or tables.shape[0] * rows_per_table != n:
        raise ValueError(f"`tables` must be [out_features / rows_per_table, entries] = [{n // rows_per_table}, E] "
                         f"(or [.., E, d] for d-element sub-vectors), "
                         f"got {tuple(getattr(tables, 'shape', ())) or type(tables).__name__}")
    if tables.dim() == 3 and k % tables.shape[2]:
        raise ValueError(f"the tables' sub-vector length d = {tables.shape[2]} does not divide in_features = {k}")


def _as_books(tables):
    """[L, E] scalar tables as [L, E, 1]; [L, E, d] codebooks as they are."""
    return tables if tables.dim() == 3 else tables[:, :, None]


@torch.no_grad()
def gptq_table(w, hessian, tables, rows_per_table=1, damp=0.01, block_size=128, act_order=True):
    """Codes of ``w`` [N, K] into ``tables`` by GPTQ with ``hessian`` = XᵀX [K, K]; row n uses table
    n // rows_per_table. tables [L, E]: one code per weight (codes [N, K]); [L, E, d]: one code per sub-vector of
    d consecutive inputs (codes [N, K // d], GPTVQ). Sub-vectors in order of decreasing input energy when
    act_order, each rounded to its row's nearest entry in the metric of the output error (below), its error
    spread over the later columns. int64 codes; runs in float64 on w's device."""
    _check(w, hessian, tables, rows_per_table, damp)
    n, k = w.shape
    books = _as_books(tables.detach().to(w.device, torch.float64))
    d = books.shape[2]
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    drop_dead_inputs(W, H)
    order = torch.argsort(torch.diag(H).reshape(k // d, d).sum(1), descending=True) if act_order else None
    if order is not None:  # whole sub-vectors move, so each stays d consecutive columns
        perm = (order[:, None] * d + torch.arange(d, device=W.device)).reshape(-1)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)
    codes = torch.empty(n, k // d, dtype=torch.long, device=W.device)
    if d == 1:
        rounding = _nearest_entry(books[:, :, 0].repeat_interleave(rows_per_table, 0), codes)
    else:
        rounding = _nearest_vector(books, rows_per_table, Hinv, codes)
    with single_threaded(W.device):
        propagate(W, Hinv, d * max(1, block_size // d), rounding)  # a sub-vector never straddles two blocks
    if order is None:
        return codes
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


def _nearest_entry(T, codes):
    """GPTQ's rounding of column c to its row's nearest entry of T [N, E]."""
    def quantize_column(c, W1, i):
        idx = (W1[:, i, None] - T).abs().argmin(1)
        codes[:, c] = idx
        return T.gather(1, idx[:, None])[:, 0]
    return quantize_column


def _nearest_vector(books, rows_per_table, Hinv, codes):
    """GPTVQ's rounding: at the first column of each sub-vector F, the codebook vector c minimizing the output
    error its choice adds. With U = Hinv[F, F] (upper triangular) the sequential column updates turn the
    sub-vector's error e = w_F − c into per-column errors ε = e·U⁻¹, so that error is ‖(w_F − c)·U⁻¹‖²: a
    Euclidean nearest neighbour after mapping rows and codebook by U⁻¹. Later columns of F return c's entries."""
    nb, _, d = books.shape
    eye = torch.eye(d, dtype=books.dtype, device=books.device)
    book = torch.arange(nb, device=books.device)[:, None]
    chosen = None

    def quantize_column(c, W1, i):
        nonlocal chosen
        if c % d == 0:
            u_inv = torch.linalg.solve_triangular(Hinv[c:c + d, c:c + d], eye, upper=True)
            idx, _ = nearest_centroids((W1[:, i:i + d] @ u_inv).reshape(nb, rows_per_table, d), books @ u_inv)
            codes[:, c // d] = idx.reshape(-1)
            chosen = books[book, idx].reshape(-1, d)
        return chosen[:, c % d]
    return quantize_column


@torch.no_grad()
def refit_tables(w, hessian, codes, tables, rows_per_table=1, ridge=1e-6, cg_iters=None):
    """Tables minimizing Σ_n (w_n − ŵ_n)ᵀ·H·(w_n − ŵ_n) over the rows for the given codes, ŵ_n row n decoded
    from its table; tables [L, E] with codes [N, K], or [L, E, d] with codes [N, K // d] (float64 on w's device).
    An entry no code uses keeps its value from ``tables`` (a ridge of ``ridge``·mean(diag H) pulls every entry
    toward it, which also keeps the solve well posed).

    The normal equations over a table's E·d numbers: A·t = b, A = Σ_n Mₙᵀ·H·Mₙ + ridge, b = Σ_n Mₙᵀ·H·wₙ, Mₙ
    [K, E·d] the one-hot of which number input k reads. Tables of ≤ 64 numbers (d = 1 at 4 bits) are solved
    exactly; larger ones (GPTVQ's 256 × 2) by ``cg_iters`` (default 30) steps of conjugate gradients from
    ``tables``, preconditioned by A's diagonal: each step is a decode, Ŵ·H and a scatter (N·K² multiply-adds in
    one matmul), and lowers the error — forming A took 17–23 s a SmolLM2 layer, 30 steps take ~0.5 s."""
    _check(w, hessian, tables, rows_per_table)
    n, k = w.shape
    dev = w.device
    books = _as_books(tables.detach().to(dev, torch.float64))
    nt, ne, d = books.shape
    e = ne * d
    H = hessian.detach().to(dev, torch.float64)
    # the number weight (n, k) reads: entry codes[n, k // d], coordinate k % d, of table n // rows_per_table
    num = codes.to(dev).repeat_interleave(d, 1) * d + torch.arange(k, device=dev) % d
    table_of = torch.arange(n, device=dev) // rows_per_table
    slot = (table_of[:, None] * e + num).reshape(-1)

    def scatter(y):  # Σ over the weights reading each number: Mᵀ·y, row by row
        return torch.zeros(nt * e, dtype=torch.float64, device=dev).index_add_(0, slot, y.reshape(-1)).reshape(nt, e)

    lam = ridge * float(torch.diag(H).mean().clamp_min(1e-30)) * rows_per_table
    old = books.reshape(nt, e)
    b = scatter(w.detach().to(dev, torch.float64) @ H) + lam * old
    if cg_iters is None and e <= 64:
        A = _normal_matrix(H, num, table_of, nt, e) + lam * torch.eye(e, dtype=torch.float64, device=dev)
        # A is positive definite: Cholesky. (torch.linalg.solve's batched LU failed — "pivots ... must be >= 1" —
        # on well-conditioned [3, 1024, 1024] batches with 2 CPU threads, in an earlier version of this function.)
        return torch.cholesky_solve(b[..., None], torch.linalg.cholesky(A))[..., 0].reshape(tables.shape)
    diag = scatter(torch.diag(H).expand(n, k)) + lam
    t = _pcg(lambda p: scatter(p.reshape(-1)[slot].reshape(n, k) @ H) + lam * p, b, old.clone(), diag,
             30 if cg_iters is None else cg_iters)
    return t.reshape(tables.shape)


def _normal_matrix(H, num, table_of, nt, e):
    """Σ over each table's rows of Mₙᵀ·H·Mₙ [nt, e, e]: Mₙᵀ·H sums H's rows by number and (·)·Mₙ its columns,
    two row-wise index_adds a row (K² + K·e additions; a dense one-hot product costs K²·e)."""
    k = H.shape[0]
    dev = H.device
    A = torch.zeros(nt, e, e, dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 23) // (k * max(k, e)))  # rows at a time: bounds the [rows, e, K] partial sums
    for r0 in range(0, num.shape[0], chunk):
        idx = num[r0:r0 + chunk]
        c = idx.shape[0]
        slots = (torch.arange(c, device=dev)[:, None] * e + idx).reshape(-1)
        MH = torch.zeros(c * e, k, dtype=torch.float64, device=dev).index_add_(0, slots, H.repeat(c, 1))
        MHM = torch.zeros(c * e, e, dtype=torch.float64, device=dev)
        MHM.index_add_(0, slots, MH.reshape(c, e, k).transpose(1, 2).reshape(c * k, e))  # (Mᵀ·(Mᵀ·H)ᵀ)ᵀ = Mᵀ·H·M
        A.index_add_(0, table_of[r0:r0 + c], MHM.reshape(c, e, e).transpose(1, 2))
    return A


def _pcg(apply, b, x, diag, iters, rtol=1e-10):
    """Conjugate gradients for apply(x) = b (apply symmetric positive definite), from x, preconditioned by 1/diag;
    at most `iters` steps, fewer once the residual is below rtol·‖b‖."""
    r = b - apply(x)
    z = r / diag
    p, rz = z.clone(), float((r * z).sum())
    stop = rtol * float(b.norm())
    for _ in range(iters):
        if float(r.norm()) <= stop:
            break
        ap = apply(p)
        alpha = rz / float((p * ap).sum())
        x += alpha * p
        r -= alpha * ap
        z = r / diag
        rz, rz_old = float((r * z).sum()), rz
        p = z + (rz / rz_old) * p
    return x


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
    """(codes int64, tables float64): `rounds` of GPTQ codes then refitted tables, starting from ``tables``
    (k-means on the weights); the round whose output error on H is smallest. tables [L, E] (codes [N, K]) or
    [L, E, d] codebooks of sub-vectors (codes [N, K // d]), returned in the shape given."""
    return _alternate(
        w, hessian, rounds, tables.to(w.device, torch.float64),
        lambda t: gptq_table(w, hessian, t, rows_per_table, damp, act_order=act_order),
        lambda codes, t: refit_tables(w, hessian, codes, t, rows_per_table),
        lambda codes, t: vq_dequantize(codes, _as_books(t), torch.float64))


def gptq_log(w, hessian, scale, levels, rounds=1, damp=0.01, act_order=True):
    """(codes [N, K] int64, scale [N] float64) of log quantization (table of row n = scale_n·levels): `rounds`
    of GPTQ codes then least-squares scales, starting from ``scale``; the round with the smallest output error."""
    levels = levels.to(w.device, torch.float64)
    return _alternate(
        w, hessian, rounds, scale.to(w.device, torch.float64),
        lambda s: gptq_table(w, hessian, s[:, None] * levels[None, :], 1, damp, act_order=act_order),
        lambda codes, _: refit_scales(w, hessian, levels[codes]),
        lambda codes, s: s[:, None] * levels[codes])
