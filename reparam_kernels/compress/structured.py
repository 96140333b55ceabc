"""Nearest structured matrices to a dense weight (Frobenius norm): circulant,
block-circulant and Toeplitz, plus their dense forms and kernel spectra.

Conventions (shared by the ops and layers):

* A b×b circulant block is given by its first column ``c``:
  ``C[r, s] = c[(r − s) mod b]``, so ``C @ x = irfft(rfft(c) · rfft(x))``.
* Block-circulant N×K weight with block size b: ``p = ceil(N/b)`` block rows,
  ``q = ceil(K/b)`` block columns, columns ``c`` [p, q, b]. When b does not
  divide N or K the structure lives on the zero-padded (p·b)×(q·b) matrix and
  only its top-left N×K part is the weight (x is zero-padded, extra outputs are
  dropped). The projection then takes, for each wrapped diagonal, the mean over
  the entries that fall inside N×K (the padded ones are not part of W, so this
  is still the Frobenius-optimal choice for the visible weight); a diagonal
  with no visible entry gets 0.
* A plain circulant is the 1×1-block case with b = max(N, K).
* Toeplitz N×K: ``T[r, s] = t[r − s + K − 1]``, ``t`` of length N + K − 1.
* Kernel spectrum layout ("w_spectrum"): a real tensor [p, q, 2, b//2 + 1]:
  plane 0 the real part and plane 1 the imaginary part of ``rfft(c, n=b)``
  (half spectrum; the kernels ignore the imaginary parts of the DC and, for
  even b, Nyquist bins, which are zero for a real ``c``). Kept in float32
  (float64 for float64 references) whatever the activation dtype: it is
  (b+2)/b² the size of the dense weight, and fp32 keeps the FFT path accurate.

Every projection returns the relative error ‖W − P(W)‖_F / ‖W‖_F.
"""
import math
from dataclasses import dataclass

import torch


def _check_weight(weight):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"`weight` must be a 2-D Tensor [out, in], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"`weight` must be a floating-point Tensor, got {weight.dtype}")


def _check_block(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")


def relative_error(weight, approx):
    w = weight.detach().double()
    den = w.norm()
    return float((w - approx.double()).norm() / den) if den > 0 else float((approx.double()).norm())


@dataclass
class BlockCirculantFit:
    columns: torch.Tensor  # [p, q, b] first columns of the blocks (float64)
    out_features: int
    in_features: int
    block_size: int
    rel_error: float

    def to_dense(self):
        return block_circulant_to_dense(self.columns, self.out_features, self.in_features)

    def spectrum(self, dtype=torch.float32):
        return block_circulant_spectrum(self.columns, dtype)


@dataclass
class ToeplitzFit:
    diagonals: torch.Tensor  # [N + K − 1], t[r − s + K − 1] (float64)
    out_features: int
    in_features: int
    rel_error: float

    def to_dense(self):
        return toeplitz_to_dense(self.diagonals, self.out_features, self.in_features)


def _wrapped_index(b, device):
    """idx[r, d] = (r − d) mod b: the column of row r on wrapped diagonal d."""
    r = torch.arange(b, device=device)
    return (r[:, None] - r[None, :]) % b


def _to_blocks(mat, p, q, b):
    """[p·b, q·b] -> [p, q, b (row r), b (col s)]."""
    return mat.reshape(p, b, q, b).permute(0, 2, 1, 3)


def project_block_circulant(weight, block_size):
    """Nearest block-circulant matrix (blocks b×b, zero-padded to whole blocks)."""
    _check_weight(weight)
    _check_block(block_size)
    n, k, b = weight.shape[0], weight.shape[1], block_size
    p, q = math.ceil(n / b), math.ceil(k / b)
    w = weight.detach().to(torch.float64)
    padded = w.new_zeros(p * b, q * b)
    padded[:n, :k] = w
    visible = w.new_zeros(p * b, q * b)
    visible[:n, :k] = 1.0
    idx = _wrapped_index(b, w.device).expand(p, q, b, b)
    sums = _to_blocks(padded, p, q, b).gather(3, idx).sum(2)     # [p, q, d]
    counts = _to_blocks(visible, p, q, b).gather(3, idx).sum(2)  # entries of diagonal d inside N×K
    columns = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
    approx = block_circulant_to_dense(columns, n, k)
    return BlockCirculantFit(columns, n, k, b, relative_error(weight, approx))


def project_circulant(weight):
    """Nearest circulant matrix: one block of size max(N, K) (mean of each wrapped diagonal)."""
    _check_weight(weight)
    return project_block_circulant(weight, max(weight.shape))


def block_circulant_to_dense(columns, out_features, in_features):
    """Dense [N, K] weight of block columns [p, q, b]."""
    p, q, b = columns.shape
    idx = _wrapped_index(b, columns.device)  # C[r, s] = c[(r − s) mod b]
    blocks = columns[:, :, idx]                # [p, q, b, b]
    dense = blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)
    return dense[:out_features, :in_features]


def block_circulant_spectrum(columns, dtype=torch.float32):
    """Kernel layout [p, q, 2, b//2 + 1] (real, imag planes of rfft(c))."""
    spec = torch.fft.rfft(columns.to(torch.float64), dim=-1)
    return torch.stack((spec.real, spec.imag), dim=2).to(dtype).contiguous()


def block_circulant_columns(w_spectrum, block_size):
    """Inverse of block_circulant_spectrum: columns [p, q, b] from the kernel layout."""
    spec = torch.complex(w_spectrum[:, :, 0].double(), w_spectrum[:, :, 1].double())
    return torch.fft.irfft(spec, n=block_size, dim=-1)


def project_toeplitz(weight):
    """Nearest Toeplitz matrix: the mean of each diagonal."""
    _check_weight(weight)
    n, k = weight.shape
    w = weight.detach().to(torch.float64)
    diag = _diag_index(n, k, w.device)
    sums = torch.zeros(n + k - 1, dtype=torch.float64, device=w.device).index_add_(0, diag.flatten(), w.flatten())
    counts = torch.bincount(diag.flatten(), minlength=n + k - 1).to(torch.float64)
    t = sums / counts
    return ToeplitzFit(t, n, k, relative_error(weight, toeplitz_to_dense(t, n, k)))


def _diag_index(n, k, device):
    return torch.arange(n, device=device)[:, None] - torch.arange(k, device=device)[None, :] + (k - 1)


def toeplitz_to_dense(diagonals, out_features, in_features):
    return diagonals[_diag_index(out_features, in_features, diagonals.device)]


def toeplitz_fft_size(out_features, in_features):
    """Circulant embedding size: the smallest power of two ≥ N + K − 1 (= 2n for a square power-of-two n)."""
    return 1 << max(1, (out_features + in_features - 2).bit_length())


def toeplitz_embedding_column(diagonals, out_features, in_features, fft_size=None):
    """First column of the L×L circulant whose top-left N×K block is the Toeplitz matrix.

    c[d] = t[d + K − 1] for the lower diagonals d = 0..N−1 and c[L − e] = t[K − 1 − e]
    for the upper ones e = 1..K−1; L ≥ N + K − 1 keeps the two from overlapping.
    """
    n, k = out_features, in_features
    size = fft_size or toeplitz_fft_size(n, k)
    if size < n + k - 1:
        raise ValueError(f"`fft_size` {size} must be at least out_features + in_features − 1 = {n + k - 1}")
    c = diagonals.new_zeros(size)
    c[:n] = diagonals[k - 1:]
    if k > 1:
        c[size - (k - 1):] = diagonals[:k - 1]  # c[L − e] = t[K − 1 − e], e = K−1..1
    return c


def toeplitz_spectrum(diagonals, out_features, in_features, fft_size=None, dtype=torch.float32):
    """Kernel layout [1, 1, 2, L//2 + 1] of the circulant embedding (see toeplitz_linear)."""
    c = toeplitz_embedding_column(diagonals.to(torch.float64), out_features, in_features, fft_size)
    return block_circulant_spectrum(c.reshape(1, 1, -1), dtype)
