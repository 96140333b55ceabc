"""Structured Linear layers: block-circulant, circulant, Toeplitz and low displacement rank.

Stored layouts (what the ops want; see compress/structured.py):

* ``BlockCirculantLinear.w_spectrum`` — float32 [p, q, 2, b//2 + 1], the real
  and imaginary planes of the rfft of each b×b block's first column; p =
  ceil(out/b), q = ceil(in/b), zero padding when b does not divide. The
  parameter is the spectrum itself, so training (distillation) updates it
  directly; the imaginary parts of the DC/Nyquist bins are inert (zero grad).
  Parameters: p·q·(b + 2) instead of out·in.
* ``CirculantLinear`` — one block of size max(in, out).
* ``ToeplitzLinear.t_spectrum`` — float32 [1, 1, 2, L//2 + 1], the spectrum of
  the L×L circulant embedding (L = next power of two ≥ in + out − 1); any
  value of it is a Toeplitz weight (the top-left block of a circulant).
* ``LDRLinear.g``, ``.h`` — generators [n, rank] (n = max(in, out)) of a
  Toeplitz-like matrix, forward by r circulant·skew-circulant FFT products
  (plain torch.fft, no custom kernel).

Spectra/generators are float32 (float64 for a float64 layer); the bias and
the activations use the layer's dtype. They stay float32 when the layer is cast to
float16 / bfloat16 (``.half()``, ``.to(dtype)``, ``model.half()``): the ops take
float32 spectra, and a half-precision copy would lose precision for good and be
cast back on every call; device moves apply to them as usual. ``from_linear`` records the relative
projection error in ``projection_error``.

Decode: ``BlockCirculantLinear`` also keeps the blocks' first columns, float32 [p, q, b]
(``w_cols``, a non-persistent buffer: the irfft of the spectrum; ``ToeplitzLinear``: ``t_cols``
[1, 1, L], its embedding's column), for
``block_circulant_cols_linear``, whose CUDA kernel runs the blocks as Toeplitz tiles on tensor
cores. ``forward`` takes it in eval mode, for fp16 / bf16 CUDA inputs of at most
``COLS_MAX_M`` rows (env ``REPARAM_BC_COLS_MAX_M``, default 16; 0 = never, Toeplitz layers too) —
Toeplitz layers ``TOEPLITZ_COLS_MAX_M`` (``REPARAM_TOEPLITZ_COLS_MAX_M``, default 256) — when no gradient
for the spectrum is wanted. The columns are recomputed when the layer enters eval mode, after
``load_state_dict``, and (eager calls) whenever the spectrum changed since; a compiled graph
cannot see the spectrum's version, so after changing the spectrum by hand in eval mode call
``refresh_cols()`` (or ``eval()``) before calling a compiled model again.
"""
import math

import torch
from torch import nn

from ..compress import ldr as _ldr
from ..compress import structured as _st
from .. import _dispatch
from .._linear import linear_from
from ..cli.env import bc_cols_max_m
from ..ops import block_circulant_cols_linear, block_circulant_linear, toeplitz_linear
from ..ops.block_circulant_cols_linear import CUDA_BLOCK_SIZES as _COLS_BLOCK_SIZES
from .._dtypes import acc_dtype

COLS_MAX_M = bc_cols_max_m()  # rows up to which eval mode decodes from w_cols
TOEPLITZ_COLS_MAX_M = bc_cols_max_m(toeplitz=True)  # ... from t_cols (ToeplitzLinear)


def _positive_int(name, val):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"`{name}` must be a positive int, got {val!r}")


def _weight_of(linear):
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"`linear` must be an nn.Linear-like module with a 2-D weight, got {type(linear).__name__}")
    return weight


def _spectrum_for(spec, x):
    """The ops take an fp32 spectrum (fp64 only with fp64 x); a layer converted by
    .half()/.to(dtype) holds another dtype, so cast (the spectrum is small)."""
    if spec.dtype == torch.float32 or (spec.dtype == torch.float64 and x.dtype == torch.float64):
        return spec
    return spec.to(acc_dtype(x.dtype))


def _copy_bias(layer, linear):
    if linear.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(linear.bias.detach())


class _StructuredBase(nn.Module):
    _FULL_PRECISION = ()  # parameters kept in float32 / float64 when the module is cast to a half dtype

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name).data for name in self._FULL_PRECISION}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            param = getattr(self, name)
            if param.dtype in (torch.float16, torch.bfloat16) and old.dtype not in (torch.float16, torch.bfloat16):
                param.data = old.to(device=param.device)  # keep the values (and dtype) it had, on the new device
                if param.grad is not None:
                    param.grad = param.grad.to(old.dtype)
        return out

    def _init_bias(self, bias, dtype, device):
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device)) if bias else None
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def to_linear(self):
        return linear_from(self.to_dense().detach(), self.bias)


class _DecodesFromColumns:
    """Eval-mode decode through block_circulant_cols_linear (see the module docstring). The class names its
    spectrum parameter (_SPECTRUM), the buffer of columns derived from it (_COLS) and their length (_size())."""

    _COLS_MAX_M = COLS_MAX_M  # rows up to which eval mode takes the columns (ToeplitzLinear: its own)

    def _init_cols(self, shape, dtype, device):
        self.register_buffer(self._COLS, torch.empty(*shape, dtype=dtype, device=device), persistent=False)
        self._cols_key = None

    def refresh_cols(self):
        """Recompute the blocks' first columns (the decode op's weights) from the spectrum."""
        spec, cur = getattr(self, self._SPECTRUM), getattr(self, self._COLS)
        with torch.no_grad():
            cols = _st.block_circulant_columns(spec.detach(), self._size()).to(spec.dtype)
            in_place_ok = not cur.is_inference() or torch.is_inference_mode_enabled()
            if in_place_ok and (cur.shape, cur.dtype, cur.device) == (cols.shape, cols.dtype, cols.device):
                cur.copy_(cols)  # in place: a captured CUDA graph keeps reading this buffer's address
            else:
                setattr(self, self._COLS, cols)
        self._cols_key = self._spectrum_key()

    def _spectrum_key(self):
        s = getattr(self, self._SPECTRUM)
        # (an inference-mode tensor has no version counter: only a new storage is seen for it)
        return s.data_ptr(), None if s.is_inference() else s._version, s.device

    def train(self, mode=True):
        out = super().train(mode)
        if not mode:
            self.refresh_cols()  # entering eval mode: what a compiled inference graph will read
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_cols()

    def _decode_cols(self, x):
        """The columns when this call takes block_circulant_cols_linear, else None."""
        if (self.training or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16)
                or self._size() not in _COLS_BLOCK_SIZES or x.numel() > self._COLS_MAX_M * x.shape[-1]
                or (torch.is_grad_enabled() and getattr(self, self._SPECTRUM).requires_grad)):
            return None
        if _dispatch.backend_of("block_circulant_cols_linear", x)[0] != "cuda":
            return None
        if not torch.compiler.is_compiling() and self._cols_key != self._spectrum_key():
            self.refresh_cols()
        cols = getattr(self, self._COLS)
        return cols if cols.dtype == torch.float32 else cols.float()  # (a float64 layer's, for half x)


class BlockCirculantLinear(_DecodesFromColumns, _StructuredBase):
    _FULL_PRECISION = ("w_spectrum", "w_cols")
    _SPECTRUM, _COLS = "w_spectrum", "w_cols"

    def __init__(self, in_features, out_features, block_size, bias=True, dtype=None, device=None):
        super().__init__()
        for name, val in (("in_features", in_features), ("out_features", out_features), ("block_size", block_size)):
            _positive_int(name, val)
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        dtype = dtype or torch.get_default_dtype()
        p, q = math.ceil(out_features / block_size), math.ceil(in_features / block_size)
        self.w_spectrum = nn.Parameter(torch.empty(p, q, 2, block_size // 2 + 1, dtype=acc_dtype(dtype), device=device))
        self._init_cols((p, q, block_size), acc_dtype(dtype), device)
        self._init_bias(bias, dtype, device)
        self.projection_error = None
        self.reset_spectrum()

    def reset_spectrum(self):
        # Block columns uniform in ±1/√in, like nn.Linear's default weight entries.
        bound = 1.0 / math.sqrt(self.in_features)
        cols = torch.empty(*self.w_spectrum.shape[:2], self.block_size, dtype=torch.float64,
                           device=self.w_spectrum.device).uniform_(-bound, bound)
        with torch.no_grad():
            self.w_spectrum.copy_(_st.block_circulant_spectrum(cols, self.w_spectrum.dtype))
        self.refresh_cols()

    @classmethod
    def from_linear(cls, linear, block_size):
        """Project a dense Linear onto b×b circulant blocks (nearest in Frobenius norm)."""
        weight = _weight_of(linear)
        fit = _st.project_block_circulant(weight, block_size)
        layer = cls(weight.shape[1], weight.shape[0], block_size, bias=linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.w_spectrum.copy_(fit.spectrum(layer.w_spectrum.dtype))
        layer.refresh_cols()
        _copy_bias(layer, linear)
        layer.projection_error = fit.rel_error
        return layer

    def _size(self):
        return self.block_size

    def to_dense(self):
        cols = _st.block_circulant_columns(self.w_spectrum.detach(), self.block_size)
        dtype = self.bias.dtype if self.bias is not None else self.w_spectrum.dtype
        return _st.block_circulant_to_dense(cols, self.out_features, self.in_features).to(dtype)

    def forward(self, x):
        cols = self._decode_cols(x)
        if cols is not None:
            return block_circulant_cols_linear(x, cols, self.out_features, self.bias)
        return block_circulant_linear(x, _spectrum_for(self.w_spectrum, x), self.block_size, self.out_features, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, bias={self.bias is not None}")


class CirculantLinear(BlockCirculantLinear):
    """One circulant of size n = max(in, out) (the 1×1-block case); x is zero-padded, outputs cut."""

    def __init__(self, in_features, out_features, bias=True, dtype=None, device=None):
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        super().__init__(in_features, out_features, max(in_features, out_features), bias, dtype, device)

    @classmethod
    def from_linear(cls, linear):
        weight = _weight_of(linear)
        fit = _st.project_circulant(weight)
        layer = cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.w_spectrum.copy_(fit.spectrum(layer.w_spectrum.dtype))
        layer.refresh_cols()
        _copy_bias(layer, linear)
        layer.projection_error = fit.rel_error
        return layer

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ToeplitzLinear(_DecodesFromColumns, _StructuredBase):
    _FULL_PRECISION = ("t_spectrum", "t_cols")
    _SPECTRUM, _COLS = "t_spectrum", "t_cols"  # t_cols [1, 1, fft_size]: the embedding's first column

    _COLS_MAX_M = TOEPLITZ_COLS_MAX_M

    def __init__(self, in_features, out_features, bias=True, dtype=None, device=None):
        super().__init__()
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.fft_size = _st.toeplitz_fft_size(out_features, in_features)
        dtype = dtype or torch.get_default_dtype()
        self.t_spectrum = nn.Parameter(torch.empty(1, 1, 2, self.fft_size // 2 + 1, dtype=acc_dtype(dtype),
                                                   device=device))
        self._init_cols((1, 1, self.fft_size), acc_dtype(dtype), device)
        self._init_bias(bias, dtype, device)
        self.projection_error = None
        bound = 1.0 / math.sqrt(in_features)
        self._set_diagonals(torch.empty(in_features + out_features - 1, dtype=torch.float64, device=device).uniform_(-bound, bound))

    def _set_diagonals(self, t):
        with torch.no_grad():
            self.t_spectrum.copy_(_st.toeplitz_spectrum(t, self.out_features, self.in_features,
                                                        self.fft_size, self.t_spectrum.dtype))
        self.refresh_cols()

    def _size(self):
        return self.fft_size

    @classmethod
    def from_linear(cls, linear):
        """Project a dense Linear onto Toeplitz matrices (mean of each diagonal)."""
        weight = _weight_of(linear)
        fit = _st.project_toeplitz(weight)
        layer = cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        layer._set_diagonals(fit.diagonals)
        _copy_bias(layer, linear)
        layer.projection_error = fit.rel_error
        return layer

    def diagonals(self):
        """t [out + in − 1] with T[r, s] = t[r − s + in − 1], read back from the embedding."""
        c = _st.block_circulant_columns(self.t_spectrum.detach(), self.fft_size)[0, 0]
        n, k = self.out_features, self.in_features
        upper = c[self.fft_size - (k - 1):] if k > 1 else c[:0]
        return torch.cat((upper, c[:n]))

    def to_dense(self):
        dtype = self.bias.dtype if self.bias is not None else self.t_spectrum.dtype
        return _st.toeplitz_to_dense(self.diagonals(), self.out_features, self.in_features).to(dtype)

    def forward(self, x):
        cols = self._decode_cols(x)
        if cols is not None:  # the embedding's top-left out x in block: x needs no padding
            return block_circulant_cols_linear(x, cols, self.out_features, self.bias)
        return toeplitz_linear(x, _spectrum_for(self.t_spectrum, x), self.fft_size, self.out_features, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fft_size={self.fft_size}, bias={self.bias is not None}"


class LDRLinear(_StructuredBase):
    _FULL_PRECISION = ("g", "h")

    def __init__(self, in_features, out_features, rank, bias=True, dtype=None, device=None):
        super().__init__()
        for name, val in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            _positive_int(name, val)
        n = max(in_features, out_features)
        if rank > n:
            raise ValueError(f"`rank` {rank} exceeds max(in_features, out_features) = {n}")
        self.in_features, self.out_features, self.rank, self.n = in_features, out_features, rank, n
        dtype = dtype or torch.get_default_dtype()
        pdt = acc_dtype(dtype)
        # ½·Σ Z₁(g)·Z₋₁(Jh) sums r·n products of entries: scale so outputs are O(|x|/√in).
        bound = (1.0 / (rank * n * math.sqrt(in_features))) ** 0.5 * 2
        self.g = nn.Parameter(torch.empty(n, rank, dtype=pdt, device=device).uniform_(-bound, bound))
        self.h = nn.Parameter(torch.empty(n, rank, dtype=pdt, device=device).uniform_(-bound, bound))
        self._init_bias(bias, dtype, device)
        self.projection_error = None

    @classmethod
    def from_linear(cls, linear, rank):
        """Generators from the rank-`rank` truncated SVD of the displacement ∇(W)."""
        weight = _weight_of(linear)
        fit = _ldr.ldr_approximate(weight, rank)
        layer = cls(weight.shape[1], weight.shape[0], rank, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.g.copy_(fit.g)
            layer.h.copy_(fit.h)
        _copy_bias(layer, linear)
        layer.projection_error = fit.rel_error
        return layer

    def to_dense(self):
        dense = _ldr.ldr_to_dense(self.g.detach().double(), self.h.detach().double())[:self.out_features, :self.in_features]
        return dense.to(self.bias.dtype if self.bias is not None else self.g.dtype)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"`x` has {x.shape[-1]} features in its last dimension, expected {self.in_features}")
        xs = torch.nn.functional.pad(x, (0, self.n - self.in_features)) if self.n > self.in_features else x
        y = _ldr.ldr_matvec(xs, self.g, self.h)[..., :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
