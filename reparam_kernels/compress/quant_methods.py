"""The quantization methods of recipes: int8, int4, log and vq (each with the low-rank correction settings of
``correction.py``); registered on import (``methods.py`` imports this module)."""
from .correction import CORRECTION_KEYS, check_correction, correction_needs_calib, with_correction
from .quantize import check_log_bits
from .registry import bad, layer_class, register_method
from .vq import check_vq_settings


def _auto_group(in_f, group):
    if group in (None, "auto"):
        for g in (128, 64, 32):
            if in_f % g == 0:
                return g
        bad("group_size", f"no group size in (128, 64, 32) divides in_features = {in_f}")
    return group


def check_int4(out_f, in_f, s):
    g = _auto_group(in_f, s.get("group_size"))
    if not isinstance(g, int) or g <= 0 or g % 32 or in_f % g:
        bad("group_size", f"{g!r} must be a multiple of 32 dividing in_features = {in_f}")
    _check_weighted(s)
    if s.get("weighted_grid") is True and (_gptq(s) or s.get("symmetric")):
        bad("weighted_grid", "weights round to nearest's asymmetric grid search: not with gptq (which always "
                              "weights its grid) or symmetric")
    steps = s.get("refine_steps", "auto")
    if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        bad("refine_steps", f"rounds of the grid's least-squares polish: a non-negative int or 'auto' (5 where the "
                             f"grid is weighted by input energy, else 0); got {steps!r}")
    b = s.get("mean_bits")
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 4 <= b <= 16):
        bad("mean_bits", f"mean bits per weight of the rule's layers (int4 where it costs least, int8 elsewhere), "
                          f"a number in [4, 16]; got {b!r}")


def _gptq(s):
    return bool(s.get("gptq", False))


def _check_weighted(s):
    if s.get("weighted_grid", "auto") not in (True, False, "auto"):
        bad("weighted_grid", f"must be true, false or 'auto' (the default: weighted when calibration data is "
                              f"given), got {s.get('weighted_grid')!r}")


def _check_lut_gptq(s):
    if s.get("weighted_grid") is True and _gptq(s):
        bad("weighted_grid", "weights round to nearest's table fit: not with gptq (which always weights it)")
    r = s.get("gptq_rounds", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        bad("gptq_rounds", f"rounds of GPTQ codes then least-squares tables, an int >= 1; got {r!r}")
    if "gptq_rounds" in s and not _gptq(s):
        bad("gptq_rounds", "sets GPTQ's rounds: give gptq: true")


def _check_log(out_f, in_f, s):
    check_log_bits(s.get("bits", 4))
    _check_weighted(s)
    _check_lut_gptq(s)


def _check_vq(out_f, in_f, s):
    check_vq_settings(out_f, in_f, s.get("bits", 4), s.get("d", 1), s.get("rows_per_codebook"))
    _check_weighted(s)
    _check_lut_gptq(s)


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
    cls = layer_class("quant", "Int8Linear", "int8")
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
    cls = layer_class("quant", "Int4Linear", "int4")
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
    cls = layer_class("quant", "LUTLinear", "log")
    return cls.from_linear(linear, method="log", bits=s.get("bits", 4), **_lut_calib(s, stats))


def _build_vq(linear, s, stats):
    cls = layer_class("quant", "LUTLinear", "vq")
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
                *_corrected(check_int4, _int4_needs_calib),
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
                    + _LUT_GPTQ_DOC + "; with d > 1, GPTVQ: a code per sub-vector, chosen in the output-error "
                    "metric (d=2, bits=8, rows_per_codebook=64: 4.19 bits a weight in fp16)" + _CORRECTION_DOC)
