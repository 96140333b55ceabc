"""Method registry: recipe method name → how to build a compressed layer.

A method is ``Method(name, build, keys, check, needs_calib)``:

* ``build(linear, settings, stats) -> nn.Module`` — the compressed layer;
  ``stats`` is the layer's CalibStats (or None without calibration data);
* ``keys`` — the settings it accepts (anything else is a recipe error);
* ``check(out_features, in_features, settings)`` — raises ValueError when the
  settings do not fit the layer's shape (run for every layer before anything
  is compressed);
* ``needs_calib(settings) -> bool`` — whether calibration data is required.

Other layers plug in with ``register_method``. Methods whose layer modules
are missing stay listed and raise a clear "not available" error when used.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

from .._linear import linear_from
from .correction import CORRECTION_KEYS, check_correction, correction_needs_calib, correction_rank, with_correction
from .quantize import check_log_bits
from .svd import factor_device, rank_for_ratio
from .vq import check_vq_settings


@dataclass
class Method:
    name: str
    build: Callable
    keys: frozenset
    check: Callable = None
    needs_calib: Callable = None
    doc: str = ""


METHODS = {}


def register_method(name, build, keys=(), check=None, needs_calib=None, doc=""):
    """Register (or replace) a recipe method; see the module docstring."""
    METHODS[name] = Method(name, build, frozenset(keys), check, needs_calib, doc)
    return METHODS[name]


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"`method`: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _layer_class(module, cls_name, method):
    """Import a layer class lazily, so a missing optional module only breaks its own methods."""
    try:
        return getattr(importlib.import_module(f"reparam_kernels.nn.{module}"), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"`method`: {method!r} is not available in this installation "
                         f"(reparam_kernels.nn.{module}.{cls_name} is missing: {e})") from None


def _bad(name, msg):
    raise ValueError(f"`{name}`: {msg}")


# ---------------------------------------------------------------- low rank
_RANK_KEYS = ("rank", "ratio", "energy")


def _check_rank(out_f, in_f, s):
    given = [k for k in _RANK_KEYS if s.get(k) is not None]
    if len(given) != 1:
        _bad("rank", f"give exactly one of rank / ratio / energy, got {given or 'none'}")
    if "rank" in given and not (isinstance(s["rank"], int) and 1 <= s["rank"] <= min(out_f, in_f)):
        _bad("rank", f"{s['rank']!r} does not fit a [{out_f}×{in_f}] layer (1..{min(out_f, in_f)})")
    if "ratio" in given:
        rank_for_ratio(out_f, in_f, s["ratio"])  # validates 0 < ratio < 1
    if "energy" in given and not (isinstance(s["energy"], (int, float)) and 0 < s["energy"] <= 1):
        _bad("energy", f"must satisfy 0 < energy <= 1, got {s['energy']!r}")


def _whiten(s):
    return bool(s.get("whiten", True))


def _check_lowrank(out_f, in_f, s):
    _check_rank(out_f, in_f, s)
    if s.get("fisher") and not _whiten(s):
        _bad("fisher", "fisher=true weights the whitened SVD's output error; it needs whiten=true")
    alloc = s.get("allocate", "uniform")
    if alloc not in ("uniform", "global"):
        _bad("allocate", f"must be 'uniform' (each layer loses `ratio`) or 'global' (one budget for all "
                         f"layers of such rules), got {alloc!r}")
    if alloc == "global" and (s.get("ratio") is None or not _whiten(s)):
        _bad("allocate", "allocate='global' needs `ratio` (the budget) and whiten=true")
    if not isinstance(s.get("pivoted", False), bool):
        _bad("pivoted", f"must be true or false, got {s['pivoted']!r}")


def _build_lowrank(linear, s, stats):
    from ..nn.lowrank import LowRankLinear
    from ..nn.pivoted import PivotedLowRankLinear

    kw = {k: s[k] for k in _RANK_KEYS if s.get(k) is not None}
    calib = stats if _whiten(s) else None
    out_weight = None
    if s.get("fisher"):
        out_weight = getattr(stats, "out_weight", None)
        if out_weight is None:
            _bad("fisher", "no Fisher weights for this layer (compress() computes them from the calibration data)")
    cls = PivotedLowRankLinear if s.get("pivoted") else LowRankLinear
    return cls.from_linear(linear, calib=calib, damping=s.get("damping", 1e-5), out_weight=out_weight, **kw)


register_method("lowrank", _build_lowrank, _RANK_KEYS + ("whiten", "damping", "fisher", "allocate", "pivoted"),
                _check_lowrank, _whiten, "truncated SVD u·v; whiten=true (default) uses activation-aware SVD (needs "
                "calibration); fisher=true weights output channels by the loss's Fisher; allocate='global' spends "
                "one parameter budget (`ratio`) across all such layers, keeping some dense; pivoted=true stores "
                "r·(out + in − r) parameters (PivotedLowRankLinear), so a ratio buys a larger rank")


def uses_more_than_energy(rule):
    """Whether a rule's method uses calibration statistics beyond each input's mean square: XᵀX (whitened SVD,
    GPTQ) or the loss's Fisher. Those need real text; measured on random tokens they mislead (docs/quant.md).
    int4's mean_bits is not among them: its Fisher only ranks layers, and random tokens ranked them as text did
    (SmolLM2: +3.40% against +3.49% at 5.38 bits, docs/quant.md)."""
    s = rule.settings
    if s.get("gptq") or s.get("fisher") or correction_rank(s):  # the correction: a whitened SVD
        return True
    return rule.method in ("lowrank", "lowrank_int4") and _whiten(s)


# ---------------------------------------------------------------- quantization
def _auto_group(in_f, group):
    if group in (None, "auto"):
        for g in (128, 64, 32):
            if in_f % g == 0:
                return g
        _bad("group_size", f"no group size in (128, 64, 32) divides in_features = {in_f}")
    return group


def _check_int4(out_f, in_f, s):
    g = _auto_group(in_f, s.get("group_size"))
    if not isinstance(g, int) or g <= 0 or g % 32 or in_f % g:
        _bad("group_size", f"{g!r} must be a multiple of 32 dividing in_features = {in_f}")
    _check_weighted(s)
    if s.get("weighted_grid") is True and (_gptq(s) or s.get("symmetric")):
        _bad("weighted_grid", "weights round to nearest's asymmetric grid search: not with gptq (which always "
                              "weights its grid) or symmetric")
    steps = s.get("refine_steps", "auto")
    if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        _bad("refine_steps", f"rounds of the grid's least-squares polish: a non-negative int or 'auto' (5 where the "
                             f"grid is weighted by input energy, else 0); got {steps!r}")
    b = s.get("mean_bits")
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 4 <= b <= 16):
        _bad("mean_bits", f"mean bits per weight of the rule's layers (int4 where it costs least, int8 elsewhere), "
                          f"a number in [4, 16]; got {b!r}")


def _gptq(s):
    return bool(s.get("gptq", False))


def _check_weighted(s):
    if s.get("weighted_grid", "auto") not in (True, False, "auto"):
        _bad("weighted_grid", f"must be true, false or 'auto' (the default: weighted when calibration data is "
                              f"given), got {s.get('weighted_grid')!r}")


def _check_lut_gptq(s):
    if s.get("weighted_grid") is True and _gptq(s):
        _bad("weighted_grid", "weights round to nearest's table fit: not with gptq (which always weights it)")
    r = s.get("gptq_rounds", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        _bad("gptq_rounds", f"rounds of GPTQ codes then least-squares tables, an int >= 1; got {r!r}")
    if "gptq_rounds" in s and not _gptq(s):
        _bad("gptq_rounds", "sets GPTQ's rounds: give gptq: true")


def _check_log(out_f, in_f, s):
    check_log_bits(s.get("bits", 4))
    _check_weighted(s)
    _check_lut_gptq(s)


def _check_vq(out_f, in_f, s):
    check_vq_settings(out_f, in_f, s.get("bits", 4), s.get("d", 1), s.get("rows_per_codebook"))
    _check_weighted(s)
    _check_lut_gptq(s)
    if _gptq(s) and s.get("d", 1) != 1:
        _bad("gptq", f"GPTQ onto codebooks of d > 1 sub-vectors (GPTVQ) is not implemented; d = {s.get('d')}")


def _lut_needs_calib(s):
    return _weighted(s) or _gptq(s)


def _weighted(s):
    """weighted_grid: true — it needs calibration data (compress refuses to run without)."""
    return s.get("weighted_grid", "auto") is True


def _auto_weighted(s):
    """weighted_grid 'auto' (the default) on a grid the weighting applies to: round to nearest's asymmetric search."""
    return s.get("weighted_grid", "auto") == "auto" and not _gptq(s) and not s.get("symmetric")


def calibration_would_weight(rule):
    """Whether calibration data would weight this rule's quantizer grid under weighted_grid 'auto'."""
    return rule.method in ("int4", "log", "vq") and _auto_weighted(rule.settings)


def _int4_needs_calib(s):
    return _gptq(s) or _weighted(s) or s.get("mean_bits") is not None  # mean_bits: Fisher + inputs pick the int8


def _grid_energy(s, stats):
    """The input energy that weights a quantizer's grid (``weighted_grid``), or None.

    "auto" (the default) weights whenever calibration statistics are there and the grid is round to nearest's
    asymmetric search: given data, the unweighted grid only throws it away (SmolLM2 int4 g128: +22.0% → +7.3%
    with Emma's energies, +8.5% with random tokens'; +6.7% / +7.8% with the polish, refine_steps 'auto';
    docs/quant.md)."""
    has_stats = stats is not None and getattr(stats, "count", 0) > 0
    return stats.mean_square.float() if has_stats and (_weighted(s) or _auto_weighted(s)) else None


def _build_int8(linear, s, stats):
    cls = _layer_class("quant", "Int8Linear", "int8")
    return cls.from_linear(linear, calib=stats if _gptq(s) else None)


# Asymmetric-grid settings of int4 (compress.quantize.asymmetric_grid): a float zero point + clipping search
# by default, for round to nearest and GPTQ alike (SmolLM2, 4 windows, docs/quant.md: RTN +22.0% vs +25.5%
# for the min/max grid with an integer zero point; GPTQ +3.3% vs +11.1%).
# refine_steps "auto": the least-squares polish of each group's (scale, zero) runs (5 rounds) where the grid is
# weighted by input energy — round to nearest given calibration data: +7.3% → +6.7% on Emma's energies, +8.5% →
# +7.8% on random tokens' — and not under GPTQ, where it hurts (+3.3% → +4.1%), nor on the unweighted grid.
INT4_GRID_DEFAULTS = {"integer_zero": False, "clip_steps": 10, "min_clip": 0.5, "refine_steps": "auto"}
AUTO_REFINE_STEPS = 5


def _int4_grid(s, energy=None):
    """The grid settings of an int4 rule, defaults filled in; `energy`: the input energy weighting its grid."""
    grid = {k: s.get(k, v) for k, v in INT4_GRID_DEFAULTS.items()}
    if grid["refine_steps"] == "auto":
        polish = energy is not None and not _gptq(s) and not grid["integer_zero"]
        grid["refine_steps"] = AUTO_REFINE_STEPS if polish else 0
    return grid


def _build_int4(linear, s, stats):
    cls = _layer_class("quant", "Int4Linear", "int4")
    g = _auto_group(linear.in_features, s.get("group_size"))
    energy = _grid_energy(s, stats)
    return cls.from_linear(linear, group_size=g, symmetric=bool(s.get("symmetric", False)),
                           calib=stats if _gptq(s) else None, input_energy=energy, **_int4_grid(s, energy))


def _lut_calib(s, stats):
    """What LUTLinear.from_linear takes from the calibration statistics: XᵀX for GPTQ, else the inputs' energy."""
    if _gptq(s):
        return {"calib": stats, "rounds": s.get("gptq_rounds", 1)}
    return {"input_energy": _grid_energy(s, stats)}


def _build_log(linear, s, stats):
    cls = _layer_class("quant", "LUTLinear", "log")
    return cls.from_linear(linear, method="log", bits=s.get("bits", 4), **_lut_calib(s, stats))


def _build_vq(linear, s, stats):
    cls = _layer_class("quant", "LUTLinear", "vq")
    return cls.from_linear(linear, method="vq", bits=s.get("bits", 4), d=s.get("d", 1),
                           rows_per_codebook=s.get("rows_per_codebook"), **_lut_calib(s, stats))


def _corrected(check=None, needs_calib=None):
    """check / needs_calib of a quantizer extended with its low-rank correction's (compress/correction.py)."""
    def check_both(out_f, in_f, s):
        check_correction(out_f, in_f, s)
        if check is not None:
            check(out_f, in_f, s)
    return check_both, (lambda s: correction_needs_calib(s) or bool(needs_calib and needs_calib(s)))


_CORRECTION_DOC = ("; correction_rank: r > 0 adds a rank-r correction of the quantization error (CorrectedLinear; "
                   "whitened SVD of W − Q when calibrated, fisher=true weights it by the loss, correction_iters: "
                   "rounds of refitting Q and the correction in turn; int4 with mean_bits: 'auto' lets the budget "
                   "choose each layer's rank)")
register_method("int8", with_correction(_build_int8), ("gptq", *CORRECTION_KEYS), *_corrected(None, _gptq),
                "per-channel symmetric int8 (RTN, or GPTQ with gptq=true)" + _CORRECTION_DOC)
register_method("int4", with_correction(_build_int4), ("group_size", "symmetric", "gptq", "weighted_grid", "mean_bits",
                                                      *INT4_GRID_DEFAULTS, *CORRECTION_KEYS),
                *_corrected(_check_int4, _int4_needs_calib),
                "group-wise int4 (group_size: auto = largest of 128/64/32 dividing in_features; gptq=true calibrates; "
                "integer_zero / clip_steps / min_clip / refine_steps: the grid, default float zero + 11x11 clipping "
                "search (+ 5 rounds of least-squares polish where weighted: refine_steps 'auto'); weighted_grid (default 'auto': whenever calibration data is given; true: required): round to nearest "
                "with that search weighted by each input's mean square on the calibration data — calib='random' "
                "measures it on random tokens, no data needed; mean_bits: a size budget for all such rules, the layers where "
                "int8 saves the most estimated loss per bit become int8 — compress/allocate_bits.py)" + _CORRECTION_DOC)
_LUT_GPTQ_DOC = ("; gptq=true: GPTQ chooses the codes on the calibration inputs and each table is refitted by least "
                 "squares to the output error (gptq_rounds: rounds of both, default 1; compress/gptq_table.py)")
register_method("log", with_correction(_build_log), ("bits", "weighted_grid", "gptq", "gptq_rounds", *CORRECTION_KEYS),
                *_corrected(_check_log, _lut_needs_calib),
                doc="log (power-of-two) quantization via a lookup table (weighted_grid, default 'auto' as int4's: "
                    "each row's scale chosen by input-energy-weighted error when calibration data is given)"
                    + _LUT_GPTQ_DOC + _CORRECTION_DOC)
register_method("vq", with_correction(_build_vq), ("bits", "d", "rows_per_codebook", "weighted_grid", "gptq",
                                                  "gptq_rounds", *CORRECTION_KEYS),
                *_corrected(_check_vq, _lut_needs_calib),
                doc="vector quantization, k-means codebook of 2^bits d-element sub-vectors (weighted_grid, default "
                    "'auto' as int4's: k-means weighted by each input's mean square when calibration data is given)"
                    + _LUT_GPTQ_DOC + " (d = 1)" + _CORRECTION_DOC)


# ---------------------------------------------------------------- combination
def _check_lowrank_int4(out_f, in_f, s):
    _check_lowrank(out_f, in_f, s)
    if s.get("group_size", "auto") != "auto":
        _check_int4(out_f, in_f, s)


def group_near(k, target=128, largest=256):
    """The int4 group for K = k: the multiple of 32 dividing k (≤ `largest`) nearest `target`, ties to the
    larger (576 → 96, 1536 → 128, 224 → 224); None if 32 does not divide k."""
    cands = [g for g in range(32, min(k, largest) + 1, 32) if k % g == 0]
    return min(cands, key=lambda g: (abs(g - target), -g)) if cands else None


def _combo_group(s, in_features):
    """The int4 group of v (and of a layer kept dense): `group_size`, or with "auto" the one near 128."""
    g = s.get("group_size", "auto")
    return group_near(in_features) if g == "auto" else g


def int4_settings_of_combo(s, in_features):
    """The `int4` settings for a `lowrank_int4` layer that global allocation keeps dense (still quantized)."""
    return {"group_size": _combo_group(s, in_features), "symmetric": bool(s.get("symmetric", False)),
            "gptq": _whiten(s)}


def _combo_rank(r):
    """r rounded down to a multiple of 32 — preferring one whose int4 group is in [96, 256] (≤ 4.34 bits per
    code with the fp16 scale and zero) if that costs at most 20% of the rank."""
    r32 = max(32, (r // 32) * 32)
    for c in range(r32, int(0.8 * r32) - 1, -32):
        if c >= 32 and group_near(c) >= 96:
            return c
    return r32


def _build_lowrank_int4(linear, s, stats):
    """Low rank, then int4 factors: v quantized first (GPTQ on the layer's inputs when calibrated), then u
    refit by least squares to the quantized v and quantized (GPTQ on the inputs it sees, v_q·X)."""
    import torch

    from ..nn.factored import FactoredLinear
    from .calib import CalibStats

    int4 = _layer_class("quant", "Int4Linear", "lowrank_int4")
    lr = _build_lowrank(linear, s, stats)
    r = _combo_rank(lr.rank)
    if r > min(linear.in_features, linear.out_features):
        _bad("rank", f"lowrank_int4 needs rank >= 32 fitting the [{linear.out_features}×{linear.in_features}] layer")
    if r != lr.rank:
        lr = _build_lowrank(linear, {**{k: v for k, v in s.items() if k not in _RANK_KEYS}, "rank": r}, stats)
    dt, dev = linear.weight.dtype, linear.weight.device
    gv = _combo_group(s, linear.in_features)
    sym = bool(s.get("symmetric", False))
    calibrated = stats is not None and _whiten(s)
    first = int4.from_linear(linear_from(lr.v.detach().to(dev, dt)), group_size=gv, symmetric=sym,
                             calib=stats if calibrated else None)
    u = lr.u.detach().double()
    u_stats = None
    if calibrated:  # u* = W·G·v_qᵀ (v_q·G·v_qᵀ)⁻¹: the best u for the quantized v on the calibration inputs
        fdev = factor_device(linear.weight)
        G = stats.gram.to(fdev, torch.float64)
        vq = first.to_dense().detach().to(fdev, torch.float64)
        H = vq @ G @ vq.t()
        H = H + 1e-6 * H.diagonal().mean() * torch.eye(r, dtype=H.dtype, device=fdev)
        u = torch.linalg.solve(H, vq @ G @ linear.weight.detach().to(fdev, torch.float64).t()).t()
        u_stats = CalibStats(r)
        u_stats.gram, u_stats.count = H, stats.count
    second = int4.from_linear(linear_from(u.to(dev, dt), linear.bias), group_size=group_near(r), symmetric=sym,
                              calib=u_stats)
    return FactoredLinear(first, second)


register_method("lowrank_int4", _build_lowrank_int4, _RANK_KEYS + ("whiten", "damping", "fisher", "allocate",
                "group_size", "symmetric"), _check_lowrank_int4, _whiten,
                "low rank (settings as lowrank; rank rounded down to a multiple of 32), then int4 factors (GPTQ when "
                "calibrated; group_size of v: auto = multiple of 32 dividing in_features nearest 128)")


# ---------------------------------------------------------------- structured
def _check_block(out_f, in_f, s):
    b = s.get("block_size")
    if not isinstance(b, int) or b < 2 or b > min(out_f, in_f):
        _bad("block_size", f"{b!r} must be an int with 2 <= block_size <= min(out, in) = {min(out_f, in_f)}")


def _build_block_circulant(linear, s, stats):
    return _layer_class("structured", "BlockCirculantLinear", "block_circulant").from_linear(linear, s["block_size"])


def _build_circulant(linear, s, stats):
    return _layer_class("structured", "CirculantLinear", "circulant").from_linear(linear)


def _build_toeplitz(linear, s, stats):
    return _layer_class("structured", "ToeplitzLinear", "toeplitz").from_linear(linear)


def _check_ldr(out_f, in_f, s):
    r = s.get("rank")
    if not isinstance(r, int) or not 1 <= r <= min(out_f, in_f):
        _bad("rank", f"{r!r} does not fit a [{out_f}×{in_f}] layer (1..{min(out_f, in_f)})")


def _build_ldr(linear, s, stats):
    return _layer_class("structured", "LDRLinear", "ldr").from_linear(linear, s["rank"])


register_method("block_circulant", _build_block_circulant, ("block_size",), _check_block,
                doc="nearest block-circulant matrix, b×b blocks (FFT kernel)")
register_method("circulant", _build_circulant, (), doc="nearest circulant matrix")
register_method("toeplitz", _build_toeplitz, (), doc="nearest Toeplitz matrix")
register_method("ldr", _build_ldr, ("rank",), _check_ldr, doc="low displacement rank")


# ---------------------------------------------------------------- tensorized (CP / Tucker)
def _build_tensorized(kind):
    cls_name = {"cp": "CPLinear", "tucker": "TuckerLinear"}[kind]

    def build(linear, s, stats):
        cls = _layer_class("tensorized", cls_name, kind)
        return cls.from_linear(linear, **s)
    return build


register_method("cp", _build_tensorized("cp"), ("rank", "in_modes", "out_modes", "max_iter"),
                doc="tensorized linear (weight reshaped to out_modes + in_modes), CP factors by ALS")
register_method("tucker", _build_tensorized("tucker"), ("ranks", "in_modes", "out_modes", "max_iter"),
                doc="tensorized linear (weight reshaped to out_modes + in_modes), Tucker by HOSVD + HOOI")


# ---------------------------------------------------------------- keep dense
register_method("skip", lambda linear, s, stats: linear, (), doc="leave the layer dense")
