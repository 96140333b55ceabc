"""Recipe methods: low rank, low rank with int4 factors, structured and tensorized layers, skip; the
quantization methods live in ``quant_methods.py`` and the registry (``register_method``, ``get_method``) in
``registry.py``; importing this module registers every method, and it re-exports the registry's names."""
from .._linear import linear_from
from .correction import correction_rank
from .quant_methods import calibration_would_weight, check_int4  # noqa: F401 (calibration_would_weight: re-exported)
from .registry import METHODS, Method, bad, get_method, layer_class, register_method  # noqa: F401 (re-exported)
from .svd import factor_device, rank_for_ratio


# ---------------------------------------------------------------- low rank
_RANK_KEYS = ("rank", "ratio", "energy")


def _check_rank(out_f, in_f, s):
    given = [k for k in _RANK_KEYS if s.get(k) is not None]
    if len(given) != 1:
        bad("rank", f"give exactly one of rank / ratio / energy, got {given or 'none'}")
    if "rank" in given and not (isinstance(s["rank"], int) and 1 <= s["rank"] <= min(out_f, in_f)):
        bad("rank", f"{s['rank']!r} does not fit a [{out_f}×{in_f}] layer (1..{min(out_f, in_f)})")
    if "ratio" in given:
        rank_for_ratio(out_f, in_f, s["ratio"])  # validates 0 < ratio < 1
    if "energy" in given and not (isinstance(s["energy"], (int, float)) and 0 < s["energy"] <= 1):
        bad("energy", f"must satisfy 0 < energy <= 1, got {s['energy']!r}")


def _whiten(s):
    return bool(s.get("whiten", True))


def _check_lowrank(out_f, in_f, s):
    _check_rank(out_f, in_f, s)
    if s.get("fisher") and not _whiten(s):
        bad("fisher", "fisher=true weights the whitened SVD's output error; it needs whiten=true")
    alloc = s.get("allocate", "uniform")
    if alloc not in ("uniform", "global"):
        bad("allocate", f"must be 'uniform' (each layer loses `ratio`) or 'global' (one budget for all "
                         f"layers of such rules), got {alloc!r}")
    if alloc == "global" and (s.get("ratio") is None or not _whiten(s)):
        bad("allocate", "allocate='global' needs `ratio` (the budget) and whiten=true")
    if not isinstance(s.get("pivoted", False), bool):
        bad("pivoted", f"must be true or false, got {s['pivoted']!r}")


def _build_lowrank(linear, s, stats):
    from ..nn.lowrank import LowRankLinear
    from ..nn.pivoted import PivotedLowRankLinear

    kw = {k: s[k] for k in _RANK_KEYS if s.get(k) is not None}
    calib = stats if _whiten(s) else None
    out_weight = None
    if s.get("fisher"):
        out_weight = getattr(stats, "out_weight", None)
        if out_weight is None:
            bad("fisher", "no Fisher weights for this layer (compress() computes them from the calibration data)")
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


# ---------------------------------------------------------------- combination
def _check_lowrank_int4(out_f, in_f, s):
    _check_lowrank(out_f, in_f, s)
    if s.get("group_size", "auto") != "auto":
        check_int4(out_f, in_f, s)


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

    int4 = layer_class("quant", "Int4Linear", "lowrank_int4")
    lr = _build_lowrank(linear, s, stats)
    r = _combo_rank(lr.rank)
    if r > min(linear.in_features, linear.out_features):
        bad("rank", f"lowrank_int4 needs rank >= 32 fitting the [{linear.out_features}×{linear.in_features}] layer")
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
        bad("block_size", f"{b!r} must be an int with 2 <= block_size <= min(out, in) = {min(out_f, in_f)}")


def _build_block_circulant(linear, s, stats):
    return layer_class("structured", "BlockCirculantLinear", "block_circulant").from_linear(linear, s["block_size"])


def _build_circulant(linear, s, stats):
    return layer_class("structured", "CirculantLinear", "circulant").from_linear(linear)


def _build_toeplitz(linear, s, stats):
    return layer_class("structured", "ToeplitzLinear", "toeplitz").from_linear(linear)


def _check_ldr(out_f, in_f, s):
    r = s.get("rank")
    if not isinstance(r, int) or not 1 <= r <= min(out_f, in_f):
        bad("rank", f"{r!r} does not fit a [{out_f}×{in_f}] layer (1..{min(out_f, in_f)})")


def _build_ldr(linear, s, stats):
    return layer_class("structured", "LDRLinear", "ldr").from_linear(linear, s["rank"])


register_method("block_circulant", _build_block_circulant, ("block_size",), _check_block,
                doc="nearest block-circulant matrix, b×b blocks (FFT kernel)")
register_method("circulant", _build_circulant, (), doc="nearest circulant matrix")
register_method("toeplitz", _build_toeplitz, (), doc="nearest Toeplitz matrix")
register_method("ldr", _build_ldr, ("rank",), _check_ldr, doc="low displacement rank")


# ---------------------------------------------------------------- tensorized (CP / Tucker)
def _build_tensorized(kind):
    cls_name = {"cp": "CPLinear", "tucker": "TuckerLinear"}[kind]

    def build(linear, s, stats):
        cls = layer_class("tensorized", cls_name, kind)
        return cls.from_linear(linear, **s)
    return build


register_method("cp", _build_tensorized("cp"), ("rank", "in_modes", "out_modes", "max_iter"),
                doc="tensorized linear (weight reshaped to out_modes + in_modes), CP factors by ALS")
register_method("tucker", _build_tensorized("tucker"), ("ranks", "in_modes", "out_modes", "max_iter"),
                doc="tensorized linear (weight reshaped to out_modes + in_modes), Tucker by HOSVD + HOOI")


# ---------------------------------------------------------------- keep dense
register_method("skip", lambda linear, s, stats: linear, (), doc="leave the layer dense")
