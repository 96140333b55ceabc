"""Mixed precision under one size budget: int4 everywhere, int8 where the loss cares most (``mean_bits``).

A rule ``method: int4, mean_bits: B`` makes B the mean bits per weight of all the layers such rules
match, scales and zero points counted at 16 bits (as deployed in fp16 / bf16): every layer starts as
int4 with the rule's settings, and layers move to per-channel int8 (round to nearest: +0.02% perplexity
on SmolLM2) in order of loss saved per extra bit until B is spent.

The loss a layer's quantization error ΔW costs is estimated as in ``fisher.py``:
ΔL ≈ ½·Σ_j F_j·(ΔW·H·ΔWᵀ)_jj, with F_j the Fisher of output channel j and H = E[x·xᵀ] of the layer's
inputs (dense model, calibration data, block by block) — so both candidates of every layer are built
once here, with the same statistics, and their errors compared in the same units across layers.
Measured on SmolLM2-135M (docs/quant.md): the Fisher from 16 × 512 random token ids ranks the layers
about as well as from text, so ``calib="random"`` serves; at equal size it beats making every
down_proj int8 (the usual hand-written choice).

With ``correction_rank: auto`` the menu of each layer also holds int4 plus a low-rank correction of its
error (``correction.py``) at ranks 8, 16, 24, …: the Fisher-weighted whitened SVD of the int4 error
E = W − Q gives every rank's loss at once — the correction of rank r removes the r largest σ² of
diag(√F)·E·H^½ from 2·ΔL — at 16·r·(N + K) bits. Each layer's options are reduced to their lower convex
hull in (bits, loss), and the steps along all hulls are taken in order of loss saved per bit while the
budget lasts (the greedy of a multiple-choice knapsack).
"""
import torch

from .blocks import matched_linears_and_batches, visit_layers
from .expert_stats import check_expert_prior
from .fisher import output_fisher
from .methods import get_method
from .recipe import Rule, plan
from .report import state_bytes
from .svd import factor_device, full_precision_matmuls

CODE_METHODS = ("int4",)  # the methods whose rules may carry mean_bits


def deployed_bits(module):
    """Bits of `module`'s state with floating tensors at 16 bits (scales, zeros, bias as deployed in
    fp16 / bf16, whatever dtype the model is in now) and integer tensors (packed codes) as stored."""
    return 8 * state_bytes(module, float_bytes=2)[1]


def quantization_loss(w, approx, fisher, stats):
    """½·Σ_j F_j·(ΔW·H·ΔWᵀ)_jj: the second-order loss increase of replacing w by approx."""
    d = (approx.detach().float() - w.detach().float())
    h = (stats.gram / max(stats.count, 1)).to(d.device, torch.float32)
    per_row = ((d @ h) * d).sum(1).double().cpu()
    return 0.5 * float((fisher.to(torch.float64) * per_row).sum())


def _gain(a, b):
    """Loss saved per extra bit from option a to option b, each (bits, loss, …)."""
    return (a[1] - b[1]) / max(b[0] - a[0], 1e-12)


def _hull(options):
    """The lower convex hull of {choice: (bits, loss)} from the cheapest option: [(bits, loss, choice)] with
    the loss saved per extra bit decreasing step by step (options that save less per bit than a dearer one
    are never worth taking first)."""
    pts = sorted(((b, l, c) for c, (b, l) in options.items()), key=lambda p: (p[0], p[1]))
    hull = [pts[0]]
    for p in pts[1:]:
        if p[1] >= hull[-1][1]:
            continue  # dearer, no better
        while len(hull) >= 2 and _gain(hull[-2], hull[-1]) <= _gain(hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def choose(menus, mean_bits):
    """{name: choice} from menus {name: (params, {choice: (bits, loss)})}: every layer at its cheapest
    option, then steps along each layer's hull in order of loss saved per bit while Σ bits ≤
    mean_bits·Σ params (a layer whose next step does not fit takes no later one)."""
    params = sum(p for p, _ in menus.values())
    budget = mean_bits * params
    hulls = {n: _hull(opts) for n, (_, opts) in menus.items()}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget * (1 + 1e-9):
        raise ValueError(f"`mean_bits` = {mean_bits}: int4 alone takes {used / params:.3f} bits per weight "
                         "in these layers (scales and zeros at 16 bits); give at least that")
    steps = [(_gain(a, b), n, i) for n, h in hulls.items()
             for i, (a, b) in enumerate(zip(h, h[1:]), 1)]
    at, blocked = {n: 0 for n in hulls}, set()
    for _, n, i in sorted(steps, key=lambda t: (-t[0], t[1], t[2])):
        if n in blocked:  # a hull's gains fall step by step, so its steps come in order
            continue
        extra = hulls[n][i][0] - hulls[n][i - 1][0]
        if used + extra <= budget:
            at[n], used = i, used + extra
        else:
            blocked.add(n)
    return {n: hulls[n][at[n]][2] for n in hulls}


def _int4_settings(settings):
    """A mean_bits rule's settings for its int4 layers: all but the budget and the menu."""
    return {k: v for k, v in settings.items() if k not in ("mean_bits", "correction_rank")}


def _mean_bits_rules(plan_):
    names = [n for n, r in plan_.items() if r.method in CODE_METHODS and r.settings.get("mean_bits") is not None]
    values = {plan_[n].settings["mean_bits"] for n in names}
    if len(values) > 1:
        raise ValueError(f"`recipe`: rules with mean_bits share one budget, so they need the same value; "
                         f"got {sorted(values)}")
    return names, (values.pop() if values else None)


def correction_losses(w, approx, fisher, stats, ranks):
    """{r: estimated loss of approx + the best rank-r correction} (½·Σ_j F_j·(ΔW·H·ΔWᵀ)_jj with the r
    largest σ² of diag(√F)·ΔW·H^½ removed), for r in `ranks` (0: no correction)."""
    dev = factor_device(w)
    d = (w.detach().to(dev, torch.float64) - approx.detach().to(dev, torch.float64))
    m = fisher.to(dev, torch.float64).sqrt()[:, None] * d @ stats.covariance_root(dev)
    s2 = torch.linalg.svdvals(m).pow(2).cpu()
    total = float(s2.sum())
    return {r: 0.5 * max(total - float(s2[:r].sum()), 0.0) for r in ranks}


def _menu(linear, stats, rule, fisher):
    """(params, {choice: (bits, loss)}): int4 with the rule's settings (choice 0), int4 + a correction of
    rank r (choice r, with correction_rank: auto) while cheaper than int8, and per-channel int8."""
    q4 = get_method("int4").build(linear, _int4_settings(rule.settings), stats)
    q8 = get_method("int8").build(linear, {}, None)
    n, k = linear.weight.shape
    b4, b8 = deployed_bits(q4), deployed_bits(q8)

    def bits(r):  # int4 + a rank-r correction in fp16
        return b4 + 16 * r * (n + k)

    ranks = [0]
    if rule.settings.get("correction_rank") == "auto":
        ranks += [r for r in range(8, min(n, k) + 1, 8) if bits(r) < b8]
    if len(ranks) > 1:  # one eigh and one SVD give every rank's loss
        losses = correction_losses(linear.weight, q4.to_dense(), fisher, stats, ranks)
    else:  # no menu of ranks: the plain estimate, as for int8
        losses = {0: quantization_loss(linear.weight, q4.to_dense(), fisher, stats)}
    options = {r: (bits(r), losses[r]) for r in ranks}
    options["int8"] = (b8, quantization_loss(linear.weight, q8.to_dense(), fisher, stats))
    return linear.weight.numel(), options


@torch.no_grad()
def plan_mixed(model, plan_, batches, progress=True, fisher=None, device=None, expert_prior=None):
    """({name: choice}, {name: menu}) for the plan's mean_bits rules: choice "int8", or the rank of the
    int4 layer's correction (0: none). fisher: {name: F} if already computed (else one pass here);
    device: where the blocks run."""
    names, mean_bits = _mean_bits_rules(plan_)
    if not names:
        return {}, {}
    if fisher is None or any(n not in fisher for n in names):
        fisher = output_fisher(model, batches, names, progress, device)
    menus = {}

    def visit(name, linear, stats):
        menus[name] = _menu(linear, stats, plan_[name], fisher[name])

    visit_layers(model, batches, names, visit, "mean_bits", progress, device, expert_prior)
    return choose(menus, mean_bits), menus


def chosen_settings(rule_settings, choice):
    """(method, settings) of a layer given its mean_bits choice."""
    if choice == "int8":
        return "int8", {}
    extra = {"correction_rank": choice, "fisher": True} if choice else {}
    return "int4", {**_int4_settings(rule_settings), **extra}


def resolve_bits(model, plan_, batches, progress=True, fisher=None, device=None, expert_prior=None):
    """The plan with its ``mean_bits`` int4 rules split per layer into int4 (the rule without mean_bits, with
    its correction where chosen) or int8 (round to nearest)."""
    chosen, _ = plan_mixed(model, plan_, batches, progress, fisher, device, expert_prior)
    return {n: Rule(rule.pattern, *chosen_settings(rule.settings, chosen[n])) if n in chosen else rule
            for n, rule in plan_.items()}


@full_precision_matmuls()
def allocate_bits(model, calib, patterns, mean_bits, batch_size=4, progress=True, device=None, expert_prior=None,
                  **int4_settings):
    """Recipe {rules: [...]} naming, for each Linear matched by `patterns` (globs, "{blocks}" allowed; lm_head
    may be one), int4 (with `int4_settings`; plus its correction's rank where ``correction_rank="auto"`` chose
    one) or int8 — the choice ``compress`` makes for a rule ``{method: int4, mean_bits: mean_bits,
    **int4_settings}``, written out to read or edit.
    device: run the blocks there one at a time (a CPU-resident model, device="cuda"); expert_prior: the prior in
    mixture-of-experts experts' statistics, as ``compress(expert_prior=)``."""
    check_expert_prior(expert_prior)
    names, batches = matched_linears_and_batches(model, patterns, calib, batch_size,
                                                 "mean_bits (random token ids serve: calib.random_tokens)")
    rule = {"method": "int4", "mean_bits": mean_bits, **int4_settings}
    plan_ = plan(model, {"rules": [{"match": n, **rule} for n in names]}, has_calib=True)  # validates
    was_training = model.training
    model.eval()
    try:
        chosen, _ = plan_mixed(model, plan_, batches, progress, device=device, expert_prior=expert_prior)
    finally:
        model.train(was_training)
    rules = []
    for n in names:
        method, settings = chosen_settings(int4_settings, chosen[n])
        rules.append({"match": n, "method": method, **settings})
    return {"name": f"int4-int8-mean-bits-{mean_bits:g}", "rules": rules}
