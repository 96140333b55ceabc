"""Scalar weight quantizers: linear (int8 / int4) and logarithmic, plus packing.

All quantizers take a weight ``w`` [N, K] (out_features, in_features) and
quantize along K, i.e. each output row gets its own scale(s).

Linear quantization (``quantize_linear``)
    * ``group_size=None``: one scale per output channel (row).
      ``group_size=g``: one scale per run of g consecutive inputs of a row,
      so scales are [N, K // g]. K must be divisible by g: a K that g does not
      divide raises ``ValueError`` (no silent padding; pad the layer yourself
      if you need it).
    * symmetric: ``w ≈ q · s`` with signed codes q in [-(2^(b-1)-1), 2^(b-1)-1]
      (int8 tensor), s = max|w| / (2^(b-1)-1); ``zero`` is None.
    * asymmetric: ``w ≈ (q − z) · s`` with unsigned codes q in [0, 2^b − 1]
      (uint8 tensor), s = (hi − lo) / (2^b − 1), z = −lo / s. The range [lo, hi]
      and z come from ``asymmetric_grid``:
      - ``integer_zero=True`` (the classic grid): lo = min(min w, 0),
        hi = max(max w, 0), z = round(−lo / s) an integer in [0, 2^b − 1], so 0
        is exactly representable;
      - ``integer_zero=False``: lo = min w, hi = max w, z = −lo / s not rounded
        (the grid spans exactly the group's range). Every int4 backend computes
        (q − z)·s with z a float, so both are the same stored format.
      - ``clip_steps=n > 0``: instead of [min, max], the best of the
        (n + 1)² ranges [a·lo, b·hi], a and b in linspace(1, ``min_clip``, n + 1),
        per group by (optionally ``importance``-weighted) squared error of the
        group's weights. Still round to nearest, no calibration data needed.
      - ``refine_steps=n > 0``: then n rounds of a least-squares polish: with the
        codes fixed, fit w ≈ a·q + b per group ((importance-)weighted least
        squares), take s = a, z = −b/a, re-round; a group keeps a new grid only
        where it lowers the group's error, so it never does worse. (SmolLM2 g128
        round to nearest: +20.0% perplexity vs +22.0% without, docs/quant.md.)

Packing (the layouts the kernels read)
    * int8: codes as an int8 [N, K] row-major tensor (``pack_int8``).
    * int4: unsigned codes 0..15, two per byte along K: byte ``j`` of row n is
      ``q[n, 2j] | q[n, 2j+1] << 4`` (low nibble = even k), a uint8 [N, K/2]
      row-major tensor (``pack_int4``). K must be even. A 16-byte load of a row
      thus holds 32 consecutive k of one output channel, which is what the
      GEMV and tile-dequantizing kernels consume.

Log quantization (``quantize_log``)
    Per output channel scale s = max|w_row|. A b-bit code is ``sign << (b-1) | m``
    with magnitude index m in [0, 2^(b-1) − 1]: m = 0 is zero and m ≥ 1 is the
    power of two 2^(m − (2^(b-1) − 1)) (so the largest m is 1·s). Rounding is to
    the nearest level in the linear domain (minimum squared error). The decode
    table per row is ``scale[n] · log_levels(b)`` (``log_lut``), which feeds the
    lookup-table op ``lut_linear`` for b = 4.
"""
import torch

from ..reference.int4_linear import unpack_nibbles


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {w.dtype}")


def check_group_size(k, group_size):
    """Validates ``group_size`` for K = k inputs; returns the effective group (k for per-channel)."""
    if group_size is None:
        return k
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"`group_size` must be a positive int or None (per channel), got {group_size!r}")
    if k % group_size != 0:
        raise ValueError(f"`group_size` = {group_size} does not divide in_features K = {k}; "
                         f"use a group size that divides K (e.g. 32, 64, 128) or pad the layer")
    return group_size


def _grouped(w, g):
    n, k = w.shape
    return w.reshape(n, k // g, g)


def _grid_of_range(lo, hi, qmax, integer_zero):
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    if integer_zero:
        zero = torch.clamp(torch.round(zero), 0, qmax)
    return scale, zero


def asym_codes(wg, scale, zero, qmax):
    """Unsigned codes of wg [..., g] on the grid (q − zero)·scale, scale/zero [...]: round to nearest."""
    return torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, qmax)


def _check_grid_args(integer_zero, clip_steps, min_clip, refine_steps=0):
    if not isinstance(integer_zero, bool):
        raise ValueError(f"`integer_zero` must be a bool, got {integer_zero!r}")
    if isinstance(clip_steps, bool) or not isinstance(clip_steps, int) or clip_steps < 0:
        raise ValueError(f"`clip_steps` must be a non-negative int, got {clip_steps!r}")
    if not 0 < min_clip <= 1:
        raise ValueError(f"`min_clip` must be in (0, 1], got {min_clip!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"`refine_steps` must be a non-negative int, got {refine_steps!r}")


@torch.no_grad()
def asymmetric_grid(wg, bits=4, integer_zero=True, clip_steps=0, min_clip=0.5, importance=None, refine_steps=0):
    """(scale, zero) [...] of the asymmetric grid for each group of ``wg`` [..., g] (see the module doc).

    importance: optional non-negative weights broadcastable to ``wg`` (e.g. the energy of each input
    column, diag XᵀX) for the squared error that ``clip_steps`` and ``refine_steps`` minimize.
    """
    _check_grid_args(integer_zero, clip_steps, min_clip, refine_steps)
    if refine_steps and integer_zero:
        raise ValueError("`refine_steps` fits a float zero point: it needs integer_zero=False")
    qmax = 2 ** bits - 1
    lo, hi = wg.amin(-1), wg.amax(-1)
    if integer_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 representable exactly
    scale, zero = _grid_of_range(lo, hi, qmax, integer_zero)

    def err(s, z):
        e = ((asym_codes(wg, s, z, qmax) - z[..., None]) * s[..., None] - wg) ** 2
        return (e if importance is None else e * importance).sum(-1)

    if clip_steps:
        scale, zero = _clip_search(wg, lo, hi, qmax, integer_zero, clip_steps, min_clip, err, scale, zero)
    if refine_steps:
        scale, zero = _refine(wg, qmax, importance, refine_steps, err, scale, zero)
    return scale, zero


def _refine(wg, qmax, importance, steps, err, scale, zero):
    """Least-squares polish of (scale, zero) with the codes held fixed, kept per group where it helps."""
    wt = torch.ones_like(wg) if importance is None else torch.broadcast_to(importance, wg.shape).to(wg.dtype)
    best = err(scale, zero)
    for _ in range(steps):
        q = asym_codes(wg, scale, zero, qmax)
        s0, s1, s2 = wt.sum(-1), (wt * q).sum(-1), (wt * q * q).sum(-1)
        t0, t1 = (wt * wg).sum(-1), (wt * q * wg).sum(-1)
        det = s0 * s2 - s1 * s1
        ok = det > 1e-12 * s0 * s0  # at least two distinct codes carry weight
        det = torch.where(ok, det, torch.ones_like(det))
        a, b = (s0 * t1 - s1 * t0) / det, (s2 * t0 - s1 * t1) / det
        ok = ok & (a > 0)
        s = torch.where(ok, a, scale)
        z = torch.where(ok, -b / torch.where(ok, a, torch.ones_like(a)), zero)
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _clip_search(wg, lo, hi, qmax, integer_zero, clip_steps, min_clip, err, scale, zero):
    """The best of the (clip_steps + 1)² clipped ranges [a·lo, b·hi] per group (the first is [lo, hi])."""
    best = err(scale, zero)
    fracs = torch.linspace(1.0, min_clip, clip_steps + 1, device="cpu").tolist()
    for a in fracs:
        for b in fracs:
            if a == 1.0 and b == 1.0:
                continue
            s, z = _grid_of_range(lo * a, hi * b, qmax, integer_zero)
            e = err(s, z)
            better = e < best
            best = torch.where(better, e, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def check_input_energy(e, k):
    if not isinstance(e, torch.Tensor) or e.shape != (k,) or not e.is_floating_point():
        raise ValueError(f"`input_energy` must be a floating-point tensor [in_features = {k}], got "
                         f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
    e = e.detach().float()
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("`input_energy` must be finite and non-negative")
    return e


@torch.no_grad()
def quantize_linear(w, bits=8, group_size=None, symmetric=True, integer_zero=True, clip_steps=0, min_clip=0.5,
                    refine_steps=0, input_energy=None):
    """Round-to-nearest linear quantization of ``w`` [N, K].

    Returns ``(q, scale, zero)``: q [N, K] (int8 signed codes if symmetric, uint8
    unsigned codes otherwise), scale [N, G] float32, zero [N, G] float32 or None
    (G = K // group_size, 1 for per-channel). See the module doc for the formulas;
    integer_zero, clip_steps, min_clip and refine_steps choose the asymmetric grid (``asymmetric_grid``).
    input_energy: optional [K] non-negative weights (the mean square of each input channel, diag XᵀX / n)
    for the squared error that the asymmetric grid's clipping search and polish minimize: the grid then
    fits the weights whose inputs are large best. Every weight is still rounded to its nearest level.
    """
    _check_weight(w)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"`bits` must be 2, 3, 4 or 8, got {bits!r}")
    _check_grid_args(integer_zero, clip_steps, min_clip, refine_steps)
    n, k = w.shape
    g = check_group_size(k, group_size)
    wg = _grouped(w.float(), g)
    importance = None
    if input_energy is not None:
        if symmetric:
            raise ValueError("`input_energy` weights the asymmetric grid's search: it needs symmetric=False")
        importance = _grouped(check_input_energy(input_energy, k).to(wg.device)[None], g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = wg.abs().amax(-1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(wg / scale[..., None]), -qmax, qmax)
        return q.reshape(n, k).to(torch.int8), scale, None
    scale, zero = asymmetric_grid(wg, bits, integer_zero, clip_steps, min_clip, importance, refine_steps)
    q = asym_codes(wg, scale, zero, 2 ** bits - 1)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def dequantize_linear(q, scale, zero=None, dtype=torch.float32):
    """Inverse of ``quantize_linear``: (q − zero) · scale, scale/zero [N, G] broadcast over groups of K // G."""
    n, k = q.shape
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1] != 0:
        raise ValueError(f"`scale` must be [N, G] with N = {n} and G dividing K = {k}, got {tuple(scale.shape)}")
    g = k // scale.shape[1]
    qg = _grouped(q.to(torch.float64), g)
    if zero is not None:
        if zero.shape != scale.shape:
            raise ValueError(f"`zero` must have the shape of `scale` {tuple(scale.shape)}, got {tuple(zero.shape)}")
        qg = qg - zero.to(torch.float64)[..., None]
    return (qg * scale.to(torch.float64)[..., None]).reshape(n, k).to(dtype)


def to_unsigned4(q, scale, zero):
    """Symmetric int4 codes (−7..7, zero None) → the unsigned-with-zero-point form (0..15, z = 8)
    that ``int4_linear`` takes; asymmetric input is returned unchanged."""
    if zero is not None:
        return q.to(torch.uint8), scale, zero
    return (q.to(torch.int16) + 8).to(torch.uint8), scale, torch.full_like(scale, 8.0)


# ---------------------------------------------------------------- packing

def pack_int8(q):
    """Signed codes in [-128, 127] (any integer dtype) → contiguous int8 [N, K]."""
    if q.is_floating_point() or q.dim() != 2:
        raise ValueError(f"`q` must be a 2-D integer tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -128 or int(q.max()) > 127):
        raise ValueError("`q` has values outside the int8 range [-128, 127]")
    return q.to(torch.int8).contiguous()


def unpack_int8(packed):
    return packed.to(torch.int16)


def pack_int4(q):
    """Unsigned 4-bit codes [N, K] (0..15, K even) → uint8 [N, K/2], low nibble = even k."""
    if q.is_floating_point() or q.dim() != 2:
        raise ValueError(f"`q` must be a 2-D integer tensor, got {q.dtype} {tuple(q.shape)}")
    if q.shape[1] % 2 != 0:
        raise ValueError(f"`q` must have an even number of columns K to pack two codes per byte, got K = {q.shape[1]}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("`q` has values outside the unsigned 4-bit range [0, 15]")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_words(words, bits, name):
    """int32 [R, C] → uint8 [R, C · 32 / bits]: value j of word [r, c] (bits bits·j ..) at column c · 32 / bits + j
    (how GPTQ, AWQ and compressed-tensors checkpoints pack their codes)."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D int32 tensor ({32 // bits} {bits}-bit values a word), got "
                         f"{getattr(words, 'dtype', type(words).__name__)} {tuple(getattr(words, 'shape', ()))}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device="cpu")
    vals = ((words.cpu()[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # (the mask drops the sign)
    return vals.reshape(words.shape[0], -1)


def unpack_int4(packed):
    """uint8 [N, K/2] → uint8 codes [N, K] (inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"`packed` must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    return unpack_nibbles(packed)


# ---------------------------------------------------------------- log quantization

def check_log_bits(bits):
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8 for log quantization, got {bits!r}")


def log_levels(bits, dtype=torch.float32, device=None):
    """The 2^bits signed decode values (unit scale), indexed by code: sign << (bits-1) | m."""
    check_log_bits(bits)
    nm = 2 ** (bits - 1)
    m = torch.arange(nm, dtype=torch.float64, device=device)
    mag = torch.where(m == 0, torch.zeros_like(m), torch.pow(2.0, m - (nm - 1)))
    return torch.cat((mag, -mag)).to(dtype)


def _log_codes(w64, scale, bits):
    nm = 2 ** (bits - 1)
    mags = log_levels(bits, torch.float64, w64.device)[:nm]  # ascending: 0, 2^-(nm-2), ..., 2^-1, 1
    a = w64.abs() / scale[:, None]
    # nearest magnitude level: mags are sorted ascending, so compare to midpoints
    m = torch.bucketize(a, (mags[1:] + mags[:-1]) / 2)
    codes = torch.where(w64 < 0, m + nm, m)
    return torch.where(m == 0, torch.zeros_like(codes), codes)  # one code for zero


@torch.no_grad()
def quantize_log(w, bits=4, scale_search=0, input_energy=None):
    """Log quantization of ``w`` [N, K]: returns (codes uint8 [N, K], scale float32 [N]).

    ``w ≈ scale[:, None] * log_levels(bits)[codes]``. scale_search=0: scale = max|w_row|.
    scale_search=s > 0: the best of s scales α·max|w_row|, α in [1/2, 1] (geometric grid),
    per row by squared error (weighted by ``input_energy`` [K] if given, as in quantize_linear);
    levels are powers of two, so [1/2, 1] covers every distinct placement of the grid (a smaller α
    only clips the row's largest weights).
    """
    _check_weight(w)
    if not isinstance(scale_search, int) or scale_search < 0:
        raise ValueError(f"`scale_search` must be a non-negative int, got {scale_search!r}")
    e = 1.0 if input_energy is None else check_input_energy(input_energy, w.shape[1]).to(w.device, torch.float64)
    w64 = w.to(torch.float64)
    levels = log_levels(bits, torch.float64, w64.device)
    scale = w64.abs().amax(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    best_scale, best_codes = scale, _log_codes(w64, scale, bits)
    if scale_search > 0:
        best_err = (e * (scale[:, None] * levels[best_codes] - w64) ** 2).sum(1)
        for alpha in torch.pow(2.0, -torch.arange(1, scale_search + 1, dtype=torch.float64, device="cpu") / (scale_search + 1)).tolist():
            sc = scale * alpha
            codes = _log_codes(w64, sc, bits)
            err = (e * (sc[:, None] * levels[codes] - w64) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, sc, best_scale)
            best_codes = torch.where(better[:, None], codes, best_codes)
    return best_codes.to(torch.uint8), best_scale.float()


def log_lut(scale, bits=4, dtype=torch.float32):
    """Per-row decode tables [N, 2^bits] = scale[n] · log_levels(bits)."""
    return (scale.to(torch.float64)[:, None] * log_levels(bits, torch.float64, scale.device)[None, :]).to(dtype)


def dequantize_log(codes, scale, bits=4, dtype=torch.float32):
    lut = log_lut(scale, bits, torch.float64)
    return torch.gather(lut, 1, codes.long()).to(dtype)
