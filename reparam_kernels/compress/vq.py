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

Which settings the ``lut_linear`` op runs directly: d = 1 with bits ≤ 4 (the
codes are 4-bit indices and the codebook is the 16-entry lookup table of each
row group). d > 1 is served by ``LUTLinear`` through the dense dequantized
weight (see nn/quant.py).
"""
import torch


def _sqdist(x, c):
    # ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖², chunked by the caller to bound memory
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(1)[None, :]


def _assign(x, c, chunk=1 << 16):
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dmin = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], chunk):
        d = _sqdist(x[i:i + chunk], c)
        dmin[i:i + chunk], idx[i:i + chunk] = d.min(1)
    return idx, dmin.clamp(min=0)


def kmeans_pp_init(x, k, gen):
    """k-means++: each next centroid drawn with probability ∝ squared distance to the nearest chosen one."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=gen, device="cpu").item()
    cents = [x[first]]
    dmin = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = dmin.sum()
        if total <= 0:  # fewer distinct points than k: repeat a point (its cluster stays empty/duplicate)
            nxt = torch.randint(n, (1,), generator=gen, device="cpu").item()
        else:
            nxt = torch.multinomial((dmin / total).cpu(), 1, generator=gen).item()
        cents.append(x[nxt])
        dmin = torch.minimum(dmin, ((x - x[nxt]) ** 2).sum(1))
    return torch.stack(cents)


def kmeans(x, k, iters=25, seed=0, max_init_points=1 << 16):
    """k-means of points x [P, d] into k centroids; returns (centroids [k, d], assignment [P])."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    pts = x
    if x.shape[0] > max_init_points:  # k-means++ is O(P·k): seed it on a random sample
        pts = x[torch.randperm(x.shape[0], generator=gen)[:max_init_points].to(x.device)]
    c = kmeans_pp_init(pts, k, gen)
    for _ in range(iters):
        idx, dmin = _assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        empty = counts == 0
        new = sums / counts.clamp(min=1)[:, None]
        if empty.any():  # re-seed empty clusters at the worst-served points
            far = torch.topk(dmin, int(empty.sum()), largest=True).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    idx, _ = _assign(x, c)
    return c, idx


@torch.no_grad()
def vq_quantize(w, d=1, bits=4, rows_per_codebook=None, iters=25, seed=0):
    """Vector-quantize ``w`` [N, K]; returns (codes [N, K // d] int64, codebooks [L, 2^bits, d] float32)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("`w` must be a 2-D floating-point tensor [out_features, in_features]")
    if not isinstance(d, int) or not 1 <= d <= 8:
        raise ValueError(f"`d` (sub-vector length) must be an int in 1..8, got {d!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 12:
        raise ValueError(f"`bits` must be an int in 1..12 (2^bits centroids), got {bits!r}")
    n, k = w.shape
    if k % d != 0:
        raise ValueError(f"`d` = {d} does not divide in_features K = {k}")
    r = n if rows_per_codebook is None else rows_per_codebook
    if not isinstance(r, int) or r <= 0 or n % r != 0:
        raise ValueError(f"`rows_per_codebook` must be a positive divisor of out_features N = {n}, got {rows_per_codebook!r}")
    ncent = 2 ** bits
    codes = torch.empty(n, k // d, dtype=torch.int64, device=w.device)
    books = []
    for li, r0 in enumerate(range(0, n, r)):
        pts = w[r0:r0 + r].float().reshape(-1, d)
        c, idx = kmeans(pts, ncent, iters=iters, seed=seed + li)
        books.append(c)
        codes[r0:r0 + r] = idx.reshape(r, k // d)
    return codes, torch.stack(books)


def vq_dequantize(codes, codebooks, dtype=torch.float32):
    """Inverse of ``vq_quantize``: W [N, K] from codes [N, K // d] and codebooks [L, 2^bits, d]."""
    n, kd = codes.shape
    nl, _, d = codebooks.shape
    if n % nl != 0:
        raise ValueError(f"`codebooks` has {nl} codebooks, which does not divide N = {n} rows")
    r = n // nl
    book_of_row = torch.arange(n, device=codes.device) // r
    w = codebooks[book_of_row[:, None], codes]  # [N, K/d, d]
    return w.reshape(n, kd * d).to(dtype)
