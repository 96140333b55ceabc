"""Vector quantization of a weight with k-means codebooks.

``w`` [N, K] is cut along K into sub-vectors of d consecutive inputs (d = 1..8,
K % d == 0 else ``ValueError``). Each sub-vector is replaced by the nearest of
2^bits centroids of a codebook. Codebooks are either one per layer
(``rows_per_codebook=None``) or one per group of consecutive output rows
(``rows_per_codebook=r``, N % r == 0), which adapts to rows of different scale.

Result: ``codes`` [N, K // d] (int64 indices into the codebook) and
``codebooks`` [L, 2^bits, d] float32 with L = N // rows_per_codebook (1 per
layer); row n uses ``codebooks[n // rows_per_codebook]``. Storage is
bits / d bits per weight plus the codebooks.

k-means: k-means++ initialisation (seeded ``torch.Generator``, so results are
reproducible), then Lloyd iterations; empty clusters are re-seeded with the
points farthest from their centroids. Runs in float32 on w's device.

Which op serves the result (``LUTLinear``, nn/quant.py): ``lut_linear`` for d = 1
with bits ≤ 4 (two 4-bit codes a byte, the codebook as each row group's 16-entry
table), ``vq_linear`` for any other d with bits ≤ 8 (a byte a sub-vector); codes
of 9–12 bits decode the dense weight.
"""
import torch

from ..reference.vq_linear import dequantize_vq
from .quantize import check_input_energy


def _features(x, c, wt=None):
    """(per-point term [L, P, 1], features [L, P, 2d], centroid features [L, k, 2d]) with
    Σ_j wt_j (x_j − c_j)² = Σ_j wt_j x_j² + [wt·x, wt] · [−2c, c²]: the [L, P, k] distances in one batched
    matmul of depth 2d (one pass over them, not five), wt = 1 without weights — the same arithmetic, so
    weights of ones give bit-identical distances."""
    w = torch.ones_like(x) if wt is None else wt
    wx = w * x
    return (wx * x).sum(-1, keepdim=True), torch.cat([wx, w], -1), torch.cat([-2 * c, c * c], -1)


def _sqdist(x, c, wt=None):
    """Squared distances (wt-weighted if given) of points x [L, P, d] to centroids c [L, k, d] → [L, P, k]."""
    xx, f, cf = _features(x, c, wt)
    return torch.bmm(f, cf.transpose(1, 2)) + xx


def nearest_centroids(x, c, wt=None, budget=1 << 22):
    """Nearest centroid of every point (by the wt-weighted distance if given), in chunks of ≤ `budget`
    distances (codebooks × points; 2^22: 16 MB chunks measured 2.2× faster than 64 MB on a 2-core CPU,
    442 k points × 256 centroids); the per-point term is added to the minimum only."""
    nl, p, _ = x.shape
    pstep = min(p, max(1, budget // c.shape[1]))  # points per chunk (all of them unless one codebook is huge)
    step = max(1, budget // (pstep * c.shape[1]))  # codebooks per chunk
    idx = torch.empty(nl, p, dtype=torch.int64, device=x.device)
    dmin = torch.empty(nl, p, dtype=x.dtype, device=x.device)
    for i in range(0, nl, step):
        for j in range(0, p, pstep):
            w = None if wt is None else wt[i:i + step, j:j + pstep]
            xx, f, cf = _features(x[i:i + step, j:j + pstep], c[i:i + step], w)
            d, ix = torch.bmm(f, cf.transpose(1, 2)).min(-1)
            dmin[i:i + step, j:j + pstep], idx[i:i + step, j:j + pstep] = d + xx[..., 0], ix
    return idx, dmin.clamp(min=0)


def kmeans_pp_init(x, k, gen, wt=None):
    """k-means++ for a batch of codebooks, x [L, P, d]: each next centroid is drawn with probability
    ∝ squared distance (wt-weighted if given) to the nearest one chosen so far (uniformly where all
    points coincide)."""
    nl, p, _ = x.shape
    rows = torch.arange(nl, device=x.device)
    first = torch.randint(p, (nl,), generator=gen, device="cpu").to(x.device)
    cents = [x[rows, first]]

    def dist(c):
        sq = (x - c[:, None, :]) ** 2
        return (sq if wt is None else wt * sq).sum(-1)

    dmin = dist(cents[0])
    for _ in range(1, k):
        total = dmin.sum(1, keepdim=True)
        probs = torch.where(total > 0, dmin / total.clamp(min=1e-30), torch.full_like(dmin, 1.0 / p))
        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(x.device)
        cents.append(x[rows, nxt])
        dmin = torch.minimum(dmin, dist(cents[-1]))
    return torch.stack(cents, 1)


def kmeans_batched(x, k, iters=25, seed=0, max_init_points=1 << 16, weights=None):
    """k-means of L independent point sets x [L, P, d] into k centroids each, all at once;
    returns (centroids [L, k, d], assignment [L, P]). Seeded: the same call gives the same result.
    weights: optional non-negative [L, P, d] weights of each coordinate — Lloyd then minimizes
    Σ wt (x − c)² (seeded by that distance; a centroid coordinate is the weighted mean of its points')."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    wt = None if weights is None else torch.broadcast_to(weights, x.shape).float()
    pts, pwt = x, wt
    if x.shape[1] > max_init_points:  # k-means++ is O(P·k): seed it on a random sample
        sample = torch.randperm(x.shape[1], generator=gen, device="cpu")[:max_init_points].to(x.device)
        pts, pwt = x[:, sample], None if wt is None else wt[:, sample]
    c = kmeans_pp_init(pts, k, gen, pwt)
    for _ in range(iters):
        idx, dmin = nearest_centroids(x, c, wt)
        flat = (idx + (torch.arange(x.shape[0], device=x.device) * k)[:, None]).reshape(-1)
        sums = torch.zeros(x.shape[0] * k, x.shape[2], dtype=x.dtype, device=x.device)
        sums.index_add_(0, flat, (x if wt is None else wt * x).reshape(-1, x.shape[2]))
        sums = sums.reshape(-1, k, x.shape[2])
        counts = torch.bincount(flat, minlength=x.shape[0] * k).to(x.dtype).reshape(-1, k)
        if wt is None:
            new = sums / counts.clamp(min=1)[..., None]
        else:  # weighted means; a coordinate whose points all weigh 0 keeps its value (nothing moves it)
            mass = torch.zeros(x.shape[0] * k, x.shape[2], dtype=x.dtype, device=x.device)
            mass = mass.index_add_(0, flat, wt.reshape(-1, x.shape[2])).reshape(-1, k, x.shape[2])
            new = torch.where(mass > 0, sums / mass.clamp(min=1e-30), c)
        for li in torch.nonzero((counts == 0).any(1)).flatten().tolist():  # re-seed empty clusters at the
            empty = counts[li] == 0                                         # worst-served points
            new[li, empty] = x[li, torch.topk(dmin[li], int(empty.sum())).indices]
        done = torch.allclose(new, c)
        c = new
        if done:
            break
    idx, _ = nearest_centroids(x, c, wt)
    return c, idx


def kmeans(x, k, iters=25, seed=0, max_init_points=1 << 16):
    """k-means of points x [P, d] into k centroids; returns (centroids [k, d], assignment [P])."""
    c, idx = kmeans_batched(x[None], k, iters, seed, max_init_points)
    return c[0], idx[0]


def check_vq_settings(n, k, bits, d, rows_per_codebook):
    """Raise ValueError unless (bits, d, rows_per_codebook) can quantize an [n, k] weight (compress checks
    a recipe with it before it changes any layer)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 8:
        raise ValueError(f"`d` (sub-vector length) must be an int in 1..8, got {d!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 12:
        raise ValueError(f"`bits` must be an int in 1..12 (2^bits centroids), got {bits!r}")
    if k % d != 0:
        raise ValueError(f"`d` = {d} does not divide in_features K = {k}")
    r = n if rows_per_codebook is None else rows_per_codebook
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or n % r != 0:
        raise ValueError(f"`rows_per_codebook` must be a positive divisor of out_features N = {n}, got {rows_per_codebook!r}")


@torch.no_grad()
def vq_quantize(w, d=1, bits=4, rows_per_codebook=None, iters=25, seed=0, input_energy=None):
    """Vector-quantize ``w`` [N, K]; returns (codes [N, K // d] int64, codebooks [L, 2^bits, d] float32).

    input_energy: optional [K] mean squares of the layer's inputs: k-means then minimizes the squared error
    weighted by them (the output error on average), as int4's ``weighted_grid`` does (docs/quant.md)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("`w` must be a 2-D floating-point tensor [out_features, in_features]")
    n, k = w.shape
    check_vq_settings(n, k, bits, d, rows_per_codebook)
    r = n if rows_per_codebook is None else rows_per_codebook
    wts = None
    if input_energy is not None:
        wts = check_input_energy(input_energy, k).to(w.device).reshape(1, 1, k // d, d).expand(n // r, r, k // d, d)
        wts = wts.reshape(n // r, r * (k // d), d)
    # all codebooks of the layer at once (batched k-means); chunks bound the [L, P, 2^bits] distances
    pts = w.float().reshape(n // r, r * (k // d), d)
    chunk = max(1, (1 << 26) // (r * (k // d) * 2 ** bits))
    books, codes = [], []
    for i in range(0, n // r, chunk):
        c, idx = kmeans_batched(pts[i:i + chunk], 2 ** bits, iters=iters, seed=seed + i,
                                weights=None if wts is None else wts[i:i + chunk])
        books.append(c)
        codes.append(idx)
    return torch.cat(codes).reshape(n, k // d), torch.cat(books)


def vq_dequantize(codes, codebooks, dtype=torch.float32):
    """Inverse of ``vq_quantize``: W [N, K] from codes [N, K // d] and codebooks [L, 2^bits, d]."""
    if codes.shape[0] % codebooks.shape[0] != 0:
        raise ValueError(f"`codebooks` has {codebooks.shape[0]} codebooks, which does not divide N = {codes.shape[0]} rows")
    return dequantize_vq(codes, codebooks, dtype)
