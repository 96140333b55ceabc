"""Quantized drop-in Linear layers: Int8Linear, Int4Linear, LUTLinear.

Each stores its weight in the packed layout its op wants (buffers, not
parameters: the codes are integers and frozen; the bias stays a Parameter),
builds itself with ``from_linear(linear, ..., calib=None)`` and returns the
effective dense weight with ``to_dense()``.

* ``Int8Linear``: int8 [N, K] symmetric per-channel codes + scales [N]
  (op ``int8_linear``). With ``calib`` the codes come from GPTQ at 8 bits.
* ``Int4Linear``: packed uint8 [N, K/2] (low nibble = even k) + scales and
  zero points [N, K // group_size] (op ``int4_linear``). Round-to-nearest, or
  GPTQ when ``calib`` is given.
* ``LUTLinear``: codes decoded through a table per row group. 4-bit codes with
  16-entry tables (log 4-bit, VQ with d = 1 and bits ≤ 4) run op ``lut_linear``
  (two codes a byte); VQ of d-element sub-vectors and tables of up to 256 entries
  (VQ d > 1 with bits ≤ 8, log 8-bit) store codes uint8 [N, K/d] and codebooks
  [L, 2^bits, d] and run op ``vq_linear`` (``kernel`` says which). 9–12-bit
  codes (int16) have no kernel: the forward decodes the dense weight and calls
  F.linear (warned once, ``uses_kernel`` is False). With ``calib``, GPTQ chooses
  the codes and the tables are refitted (log, VQ; d > 1 is GPTVQ).

``calib``: the layer's inputs X [n, in_features], or a ``compress.calib.CalibStats``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import as_dtype, warn_once
from ..compress import quantize as Q
from ..compress.gptq import gptq_quantize
from ..compress.gptq_table import gptq_log, gptq_vq
from ..compress.vq import vq_dequantize, vq_quantize
from ..ops import int4_linear, int8_linear, lut_linear, vq_linear


def _weight_of(linear):
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"`linear` must be an nn.Linear-like module with a 2-D weight, got {type(linear).__name__}")
    return w.detach()


def _hessian(calib, k):
    gram = getattr(calib, "gram", None)
    if gram is None:
        if not isinstance(calib, torch.Tensor) or calib.shape[-1] != k:
            raise ValueError(f"`calib` must be the layer inputs [n, {k}] or a CalibStats, got "
                             f"{tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__}")
        x = calib.detach().reshape(-1, k).to(torch.float64)
        gram = x.t() @ x
    if tuple(gram.shape) != (k, k):
        raise ValueError(f"`calib` has in_features {gram.shape[0]}, the layer has {k}")
    return gram


class _QuantBase(nn.Module):
    def __init__(self, in_features, out_features, bias, dtype, device):
        super().__init__()
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"`{name}` must be a positive int, got {val!r}")
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def _set_bias(self, linear):
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias.detach())

    def _bias_for(self, x):
        return as_dtype(self.bias, x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantBase):
    def __init__(self, in_features, out_features, bias=True, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype or torch.get_default_dtype(), device=device))

    @classmethod
    def from_linear(cls, linear, calib=None, damp=0.01, act_order=True):
        """Per-channel symmetric int8; GPTQ (8-bit, per channel, columns in act order) when ``calib`` is given."""
        w = _weight_of(linear)
        n, k = w.shape
        if calib is None:
            q, s, _ = Q.quantize_linear(w, bits=8, symmetric=True)
        else:
            qu, s, _ = gptq_quantize(w, _hessian(calib, k), bits=8, group_size=None, symmetric=True, damp=damp,
                                     act_order=act_order)
            q = qu.to(torch.int16) - 128  # symmetric GPTQ codes carry the zero point 128
        layer = cls(k, n, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        layer.qweight.copy_(Q.pack_int8(q))
        layer.scales.copy_(s[:, 0])
        layer._set_bias(linear)
        return layer

    def to_dense(self):
        return (self.qweight.float() * self.scales.float()[:, None]).to(self.scales.dtype)

    def forward(self, x):
        return int8_linear(x, self.qweight, as_dtype(self.scales, x.dtype), self._bias_for(x))


class Int4Linear(_QuantBase):
    def __init__(self, in_features, out_features, group_size=128, bias=True, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 32 or in_features % group_size:
            raise ValueError(f"`group_size` must be a multiple of 32 that divides in_features = {in_features}, "
                             f"got {group_size!r}")
        self.group_size = group_size
        g = in_features // group_size
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # parameters (frozen by default) so that distillation can train them (PEQA-style): the codes stay fixed
        self.scales = nn.Parameter(torch.ones(out_features, g, dtype=dtype, device=device), requires_grad=False)
        self.zeros = nn.Parameter(torch.full((out_features, g), 8.0, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, group_size=128, symmetric=False, calib=None, damp=0.01, act_order=True,
                    integer_zero=False, clip_steps=10, min_clip=0.5, refine_steps=0, input_energy=None):
        """Group-wise int4, round-to-nearest; GPTQ when ``calib`` (inputs or CalibStats) is given
        (act_order: columns by decreasing input energy, with static groups; see compress/gptq.py).
        integer_zero / clip_steps / min_clip / refine_steps choose the asymmetric grid of each group
        (``compress.quantize.asymmetric_grid``; with calib the clipping is weighted by input energy). The default,
        a float zero point and the best of 11 × 11 clipped ranges per group, measured better than the min/max
        grid with an integer zero (``integer_zero=True, clip_steps=0``) for both (docs/quant.md).
        input_energy: round to nearest only — [in_features] mean squares of the layer's inputs that weight
        the grid search's error (``compress.quantize.quantize_linear``); ``compress(..., calib="random")``
        measures them on random tokens, without data (docs/quant.md)."""
        w = _weight_of(linear)
        n, k = w.shape
        layer = cls(k, n, group_size=group_size, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        grid = dict(integer_zero=integer_zero, clip_steps=clip_steps, min_clip=min_clip, refine_steps=refine_steps)
        if calib is None:
            q, s, z = Q.to_unsigned4(*Q.quantize_linear(w, bits=4, group_size=group_size, symmetric=symmetric,
                                                        input_energy=input_energy, **grid))
        elif input_energy is not None:
            raise ValueError("`input_energy` weights round to nearest; GPTQ (`calib` given) takes the energy "
                             "from calib itself")
        else:
            q, s, z = gptq_quantize(w, _hessian(calib, k), bits=4, group_size=group_size, symmetric=symmetric,
                                    damp=damp, act_order=act_order, **grid)
        with torch.no_grad():
            layer.qweight.copy_(Q.pack_int4(q))
            layer.scales.copy_(s)
            layer.zeros.copy_(z)
        layer._set_bias(linear)
        return layer

    def to_dense(self):
        q = Q.unpack_int4(self.qweight)
        return Q.dequantize_linear(q, self.scales.float(), self.zeros.float(), dtype=self.scales.dtype)

    def forward(self, x):
        return int4_linear(x, self.qweight, as_dtype(self.scales, x.dtype), as_dtype(self.zeros, x.dtype), self.group_size,
                           self._bias_for(x))

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"


class LUTLinear(_QuantBase):
    """Weight W[n, k] = table of row n's group at code[n, k]; see the module doc for the kernel/fallback split."""

    def __init__(self, in_features, out_features, bits=4, d=1, num_tables=1, bias=True, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if in_features % d or out_features % num_tables:
            raise ValueError(f"`d` = {d} must divide in_features and `num_tables` = {num_tables} out_features")
        self.bits, self.d, self.num_tables = bits, d, num_tables
        packed = d == 1 and bits <= 4 and in_features % 2 == 0  # lut_linear's two codes a byte
        self.kernel = "lut_linear" if packed else "vq_linear" if bits <= 8 else None
        dtype = dtype or torch.get_default_dtype()
        if packed:
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            # a frozen Parameter, not a buffer: distill() trains the tables (the codes stay fixed)
            self.lut = nn.Parameter(torch.zeros(num_tables, 16, dtype=dtype, device=device), requires_grad=False)
        else:
            # the narrowest integer holding 2^bits codes (vq allows bits ≤ 12): int32 made d=2, bits=8 cost 16
            # bits per weight stored instead of 4 (checkpoints with int32 codes still load: load_state_dict casts)
            code_dtype = torch.uint8 if bits <= 8 else torch.int16
            self.register_buffer("codes", torch.zeros(out_features, in_features // d, dtype=code_dtype, device=device))
            self.codebooks = nn.Parameter(torch.zeros(num_tables, 2 ** bits, d, dtype=dtype, device=device),
                                          requires_grad=False)

    @classmethod
    def from_linear(cls, linear, method="log", bits=4, d=1, rows_per_codebook=None, calib=None, iters=25, seed=0,
                    input_energy=None, rounds=1, damp=0.01, act_order=True):
        """method="log": sign + power-of-two codes (bits 4 or 8), one table per row.
        method="vq": k-means codebook of 2^bits d-element sub-vectors, one per layer or per
        ``rows_per_codebook`` rows. input_energy: [in_features] mean squares of the inputs that weight
        the squared error the row scale search (log) or k-means (vq) minimizes, as in Int4Linear.

        calib (inputs or CalibStats): the tables are fitted weighted by the inputs' energy (XᵀX's diagonal), then
        GPTQ chooses the codes and the tables are refitted by least squares to the layer's output error on
        those inputs, `rounds` times (``compress/gptq_table.py``; vq with d > 1: GPTVQ, a code per sub-vector)."""
        w = _weight_of(linear)
        n, k = w.shape
        H = None
        if calib is not None:
            if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
                raise ValueError(f"`rounds` must be a positive int, got {rounds!r}")
            H = _hessian(calib, k)
            if input_energy is None:
                input_energy = torch.diag(H).float()  # only their ratios matter to the fits
        if method == "log":
            codes, scale = Q.quantize_log(w, bits, scale_search=16, input_energy=input_energy)  # best row scale
            if H is not None:
                codes, scale = gptq_log(w, H, scale, Q.log_levels(bits, torch.float64), rounds, damp, act_order)
            books = Q.log_lut(scale, bits)[:, :, None]  # [N, 2^bits, 1]
            codes, d = codes.long(), 1
        elif method == "vq":
            codes, books = vq_quantize(w, d=d, bits=bits, rows_per_codebook=rows_per_codebook, iters=iters, seed=seed,
                                       input_energy=input_energy)
            if H is not None:
                codes, books = gptq_vq(w, H, books, rows_per_codebook or n, rounds, damp, act_order)
                books = books.float()
        else:
            raise ValueError(f"`method` must be 'log' or 'vq', got {method!r}")
        layer = cls(k, n, bits=bits, d=d, num_tables=books.shape[0], bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        if layer.packed:
            lut = torch.zeros(books.shape[0], 16, dtype=torch.float32, device=w.device)
            lut[:, :books.shape[1]] = books[:, :, 0]  # fewer than 16 centroids: unused entries stay 0
            layer.codes.copy_(Q.pack_int4(codes.to(torch.uint8)))
            layer.lut.copy_(lut)
        else:
            layer.codes.copy_(codes.to(layer.codes.dtype))
            layer.codebooks.copy_(books)
        layer._set_bias(linear)
        return layer

    @property
    def packed(self):
        """lut_linear's layout: two 4-bit codes a byte and [L, 16] tables."""
        return self.kernel == "lut_linear"

    @property
    def uses_kernel(self):
        return self.kernel is not None

    def to_dense(self):
        if self.packed:
            from ..reference.lut_linear import dequantize_lut
            return dequantize_lut(self.codes, self.lut, torch.float32).to(self.lut.dtype)
        return vq_dequantize(self.codes.long(), self.codebooks.float()).to(self.codebooks.dtype)

    def forward(self, x):
        if self.packed:
            return lut_linear(x, self.codes, as_dtype(self.lut, x.dtype), self._bias_for(x))
        if self.kernel == "vq_linear":
            return vq_linear(x, self.codes, as_dtype(self.codebooks, x.dtype), self._bias_for(x))
        warn_once(("LUTLinear", self.bits, self.d),
                  f"LUTLinear(bits={self.bits}, d={self.d}): no kernel for codes of more than 8 bits "
                  "(vq_linear takes up to 256 entries); decoding the dense weight and using F.linear")
        return F.linear(x, self.to_dense().to(x.dtype), self._bias_for(x))

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, d={self.d}, num_tables={self.num_tables}, kernel={self.kernel}"
