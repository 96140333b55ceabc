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
"""
import torch

from .blocks import matched_linears_and_batches, visit_layers
from .fisher import output_fisher
from .methods import get_method
from .recipe import Rule, plan
from .report import state_bytes
from .svd import full_precision_matmuls

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


def choose_int8(cands, mean_bits):
    """{name: True = int8} from cands {name: (bits4, bits8, loss4, loss8, params)}: int4 everywhere, then
    int8 in order of loss saved per extra bit while Σ bits ≤ mean_bits·Σ params."""
    params = sum(c[4] for c in cands.values())
    budget = mean_bits * params
    used = sum(c[0] for c in cands.values())
    if used > budget * (1 + 1e-9):
        raise ValueError(f"`mean_bits` = {mean_bits}: int4 alone takes {used / params:.3f} bits per weight "
                         "in these layers (scales and zeros at 16 bits); give at least that")
    order = sorted(cands, key=lambda n: -(cands[n][2] - cands[n][3]) / max(cands[n][1] - cands[n][0], 1))
    chosen = {n: False for n in cands}
    for n in order:
        b4, b8, l4, l8, _ = cands[n]
        if l8 < l4 and used + (b8 - b4) <= budget:
            chosen[n], used = True, used + (b8 - b4)
    return chosen


def _int4_settings(rule):
    """The rule's settings for the layers that stay int4: all but the budget."""
    return {k: v for k, v in rule.settings.items() if k != "mean_bits"}


def _mean_bits_rules(plan_):
    names = [n for n, r in plan_.items() if r.method in CODE_METHODS and r.settings.get("mean_bits") is not None]
    values = {plan_[n].settings["mean_bits"] for n in names}
    if len(values) > 1:
        raise ValueError(f"`recipe`: rules with mean_bits share one budget, so they need the same value; "
                         f"got {sorted(values)}")
    return names, (values.pop() if values else None)


@torch.no_grad()
def plan_int8(model, plan_, batches, progress=True, fisher=None, device=None):
    """({name: True = int8}, {name: (bits4, bits8, loss4, loss8, params)}) for the plan's mean_bits rules.
    fisher: {name: F} if already computed (else one pass here); device: where the blocks run."""
    names, mean_bits = _mean_bits_rules(plan_)
    if not names:
        return {}, {}
    if fisher is None or any(n not in fisher for n in names):
        fisher = output_fisher(model, batches, names, progress, device)
    cands = {}

    def visit(name, linear, stats):
        q4 = get_method("int4").build(linear, _int4_settings(plan_[name]), stats)
        q8 = get_method("int8").build(linear, {}, None)
        cands[name] = (deployed_bits(q4), deployed_bits(q8),
                       quantization_loss(linear.weight, q4.to_dense(), fisher[name], stats),
                       quantization_loss(linear.weight, q8.to_dense(), fisher[name], stats), linear.weight.numel())

    visit_layers(model, batches, names, visit, "mean_bits", progress, device)
    return choose_int8(cands, mean_bits), cands


def resolve_bits(model, plan_, batches, progress=True, fisher=None, device=None):
    """The plan with its ``mean_bits`` int4 rules split per layer into int4 (the rule without mean_bits) or
    int8 (round to nearest)."""
    chosen, _ = plan_int8(model, plan_, batches, progress, fisher, device)
    out = {}
    for n, rule in plan_.items():
        if n not in chosen:
            out[n] = rule
        elif chosen[n]:
            out[n] = Rule(rule.pattern, "int8", {})
        else:
            out[n] = Rule(rule.pattern, rule.method, _int4_settings(rule))
    return out


@full_precision_matmuls()
def allocate_bits(model, calib, patterns, mean_bits, batch_size=4, progress=True, device=None, **int4_settings):
    """Recipe {rules: [...]} naming, for each Linear matched by `patterns` (globs, inside the transformer
    blocks), int4 (with `int4_settings`) or int8 — the choice ``compress`` makes for a rule
    ``{method: int4, mean_bits: mean_bits, **int4_settings}``, written out to read or edit.
    device: run the blocks there one at a time (a CPU-resident model, device="cuda")."""
    names, batches = matched_linears_and_batches(model, patterns, calib, batch_size,
                                                 "mean_bits (random token ids serve: calib.random_tokens)")
    rule = {"method": "int4", "mean_bits": mean_bits, **int4_settings}
    plan_ = plan(model, {"rules": [{"match": n, **rule} for n in names]}, has_calib=True)  # validates
    was_training = model.training
    model.eval()
    try:
        chosen, _ = plan_int8(model, plan_, batches, progress, device=device)
    finally:
        model.train(was_training)
    return {"name": f"int4-int8-mean-bits-{mean_bits:g}",
            "rules": [{"match": n, "method": "int8"} if chosen[n] else {"match": n, "method": "int4", **int4_settings}
                      for n in names]}
