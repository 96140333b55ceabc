"""Global rank allocation for low-rank compression under one parameter budget.

A uniform ratio gives every layer the same share of parameters, although the
loss cares about some layers' errors far more than others'. With σ_i the
singular values of D·W·S (S: input whitening, D = √Fisher of the outputs, see
``fisher.py``), dropping direction i of layer ℓ costs ≈ ½σ_i² of loss and
keeping it costs (out + in) parameters — in the same units in every layer. So
directions are kept in order of σ_i²/(out + in) until (1 − ratio) of the
layers' weights is spent (a threshold τ found by bisection). A layer whose
rank would reach the break-even point r·(out + in) ≥ out·in stays dense (it
then costs out·in). Measured on SmolLM2-135M at 20% fewer parameters: 27.2
perplexity against 42.5 for the same Fisher-weighted SVD at a uniform ratio
(dense 20.3); 67 of 210 Linears stayed dense, mostly v_proj and down_proj.

Without the Fisher weights (``fisher=False``) the σ² are output energies on
the calibration data, which are not comparable between layers; an earlier
version normalized them per layer and measured *worse* than uniform. Keep
``fisher=True`` unless there is a reason not to.

``resolve_global`` is what ``compress`` calls for rules with
``allocate: global`` (methods ``lowrank`` and ``lowrank_int4``; a
``lowrank_int4`` layer kept dense becomes ``int4``); ``allocate_ranks``
returns the same choice as a recipe.
"""
import torch

from .blocks import matched_linears_and_batches, visit_layers
from .fisher import channel_weights, output_fisher
from .methods import int4_settings_of_combo
from .recipe import Rule
from .svd import full_precision_matmuls, whitened_spectrum


LOWRANK_METHODS = ("lowrank", "lowrank_int4")  # the methods whose rank `allocate: global` chooses


def layer_spectra(model, batches, names, fisher=None, progress=True, device=None):
    """{name: σ² of diag(√F)·W·S (on the CPU)} for the Linears `names` (in the transformer blocks, or after
    them: lm_head) of the dense `model`, with statistics gathered block by block on the calibration batches
    (on `device`). A Linear no calibration token reached (an expert the router never chose) has none; an expert
    is planned on its own tokens, without compress's prior (expert_stats.py): measured on upcycled SmolLM2 at ~64
    tokens an expert, planning on the prior took the experts' low rank from +105% perplexity to +175%."""
    spectra = {}

    def visit(name, linear, stats):
        if stats.count == 0:
            return
        d = channel_weights(fisher[name]) if fisher is not None else None
        spectra[name] = whitened_spectrum(linear.weight, stats.gram, d).cpu()

    visit_layers(model, batches, names, visit, "allocate", progress, device)
    return spectra


RANK_MULTIPLE = 8  # ranks >= 2 * RANK_MULTIPLE are rounded down to a multiple of it


def kernel_friendly_rank(r):
    """r rounded down to a multiple of 8 once r >= 16: the GPU decode path (csrc/lowrank_small_m.cuh)
    takes r (and, pivoted, in − r) in multiples of 8 for its 16-byte loads; smaller ranks stay exact."""
    return r - r % RANK_MULTIPLE if r >= 2 * RANK_MULTIPLE else r


def uniform_rank(out_f, in_f, ratio, pivoted=False):
    """The largest kernel-friendly rank storing at most (1 − ratio)·out·in parameters (at least 1)."""
    keep = (1.0 - ratio) * out_f * in_f
    fits = [r for r in range(1, min(out_f, in_f)) if r * (out_f + in_f - r if pivoted else out_f + in_f) <= keep]
    return kernel_friendly_rank(max(fits, default=1))


def choose_ranks(spectra, shapes, ratio, pivoted=False):
    """{name: rank, or None = stay dense} spending at most (1 − ratio)·Σ out·in parameters.

    pivoted: the layers store r·(out + in − r) parameters (PivotedLowRankLinear); direction j then
    costs (out + in − j) on average over the first j + 1, and only full rank means dense.
    Ranks are kernel_friendly_rank()s (rounded down: the budget still holds)."""
    budget = (1.0 - ratio) * sum(o * i for o, i in shapes.values())

    def pick(tau):
        total, ranks = 0, {}
        for n, e in spectra.items():
            o, i = shapes[n]
            if pivoted:
                r = min(max(1, int((e / (o + i - torch.arange(len(e), dtype=e.dtype, device=e.device)) > tau).sum())), min(o, i))
                if r < min(o, i):
                    r = kernel_friendly_rank(r)
                dense, cost = r >= min(o, i), r * (o + i - r)
            else:
                r = kernel_friendly_rank(max(1, int((e / (o + i) > tau).sum())))
                dense, cost = r * (o + i) >= o * i, r * (o + i)
            if dense:
                ranks[n], total = None, total + o * i
            else:
                ranks[n], total = r, total + cost
        return total, ranks

    lo, hi = 1e-300, max(float(e[0]) for e in spectra.values()) + 1.0   # pick(hi): every layer rank 1
    if pick(hi)[0] > budget:
        raise ValueError(f"`ratio` = {ratio}: even rank 1 everywhere keeps more than {1 - ratio:.0%} of the parameters")
    for _ in range(200):  # bisection on a log scale
        mid = (lo * hi) ** 0.5
        if pick(mid)[0] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[1]


def _plan_ranks(model, batches, names, ratio, use_fisher, progress, pivoted=False, fisher=None, device=None):
    """({name: rank or None}, {name: F} or None); fisher: the Fisher already computed (else one pass here)."""
    if use_fisher and (fisher is None or any(n not in fisher for n in names)):
        fisher = output_fisher(model, batches, names, progress, device)
    fisher = {n: fisher[n] for n in names} if use_fisher else None
    spectra = layer_spectra(model, batches, names, fisher, progress, device)
    mods = dict(model.named_modules())
    shapes = {n: tuple(mods[n].weight.shape) for n in names}
    ranks = choose_ranks(spectra, {n: shapes[n] for n in spectra}, ratio, pivoted) if spectra else {}
    for n in names:  # no calibration token reached it: no evidence, so its own share of the budget (ratio)
        if n not in spectra:
            ranks[n] = uniform_rank(*shapes[n], ratio, pivoted)
    return ranks, fisher


def resolve_global(model, plan_, batches, progress=True, fisher=None, device=None):
    """Replace the plan's ``allocate: global`` low-rank rules by per-layer ranks.

    A layer no calibration token reached keeps the uniform `ratio` instead (the loss estimate has no evidence
    on it; the others share their part of the budget). Returns (plan, fisher): layers allocation keeps dense
    leave the plan; fisher is
    {name: F} for those rules (or None). fisher: the Fisher of those layers if already computed;
    device: where the blocks run (``compress(device=)``)."""
    names = [n for n, r in plan_.items() if r.method in LOWRANK_METHODS and r.settings.get("allocate") == "global"]
    if not names:
        return plan_, None
    ratios = {plan_[n].settings["ratio"] for n in names}
    fishers = {bool(plan_[n].settings.get("fisher")) for n in names}
    pivots = {bool(plan_[n].settings.get("pivoted")) for n in names}
    if len(ratios) > 1 or len(fishers) > 1 or len(pivots) > 1:
        raise ValueError(f"`recipe`: rules with allocate='global' share one budget, so they need the same `ratio`, "
                         f"`fisher` and `pivoted`; got ratios {sorted(ratios)}, fisher {sorted(fishers)}, "
                         f"pivoted {sorted(pivots)}")
    ranks, fisher = _plan_ranks(model, batches, names, ratios.pop(), fishers.pop(), progress, pivots.pop(), fisher, device)
    out = {}
    for n, rule in plan_.items():
        if n not in ranks:
            out[n] = rule
        elif ranks[n] is not None:
            s = {k: v for k, v in rule.settings.items() if k not in ("ratio", "allocate")}
            out[n] = Rule(rule.pattern, rule.method, {**s, "rank": ranks[n]})
        elif rule.method == "lowrank_int4":  # kept dense, but its weight is still quantized
            out[n] = Rule(rule.pattern, "int4", int4_settings_of_combo(rule.settings, model.get_submodule(n).in_features))
    return out, fisher


@full_precision_matmuls()
def allocate_ranks(model, calib, patterns, ratio, fisher=True, batch_size=4, progress=True, pivoted=False,
                   device=None):
    """Recipe {rules: [...]} giving each Linear matched by `patterns` (globs) a rank (or `skip` to
    stay dense), so that those layers lose `ratio` of their parameters in total. device: run the
    blocks there one at a time (a CPU-resident model, device="cuda"), as ``compress(device=)``."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"`ratio` must satisfy 0 < ratio < 1, got {ratio!r}")
    names, batches = matched_linears_and_batches(model, patterns, calib, batch_size, "global allocation")
    model.eval()
    ranks, _ = _plan_ranks(model, batches, names, float(ratio), fisher, progress, bool(pivoted), device=device)
    extra = {"pivoted": True} if pivoted else {}
    rules = [{"match": n, "method": "skip"} if r is None else
             {"match": n, "method": "lowrank", "rank": r, "whiten": True, "fisher": bool(fisher), **extra}
             for n, r in ranks.items()]
    return {"name": f"lowrank-global-{ratio}", "rules": rules}
