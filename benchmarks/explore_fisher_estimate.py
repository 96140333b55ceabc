"""How well the Fisher estimate behind `mean_bits` predicts what int4 costs, per kind of Linear (SmolLM2;
an exploration, docs/quant.md § lm_head too).

    python benchmarks/explore_fisher_estimate.py [--kinds q_proj,...,lm_head] [--sampled] [--estimates-only]

For each kind (30 layers; or lm_head) int4 round to nearest on the weighted grid with its polish, calibrated
on 16 x 512 tokens of Emma, is applied to that kind alone: measured = ln(perplexity ratio) on the 4 windows of
Pride and Prejudice (nats a token); estimated = the sum of the kind's int4 losses in the mean_bits menus
(compress/allocate_bits.py: ½·Σ_j F_j·(ΔW·H·ΔWᵀ)_jj). --sampled: the Fisher from labels drawn from the model's
own distribution (the true Fisher) instead of the text's next tokens. Prints a row per kind (~2.5 min each
on 2 CPU cores, plus ~3 min for the menus).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_kernels as rk  # noqa: E402
from reparam_kernels import data  # noqa: E402
from reparam_kernels.compress import fisher  # noqa: E402
from reparam_kernels.compress.allocate_bits import plan_mixed  # noqa: E402
from reparam_kernels.compress.recipe import plan  # noqa: E402
from reparam_kernels.evaluate import perplexity, token_windows  # noqa: E402

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def pattern(kind):
    return "lm_head" if kind == "lm_head" else f"model.layers.*.{kind}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--sampled", action="store_true", help="the true Fisher (labels sampled from the model)")
    p.add_argument("--estimates-only", action="store_true", help="skip the measured column (the menus only)")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if args.sampled:
        fisher.DEFAULT_LABELS = "sampled"  # output_fisher(labels="sampled"), seed fisher.SEED
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    evals = token_windows(tok, data.austen("prideprejudice"), window=1024, max_windows=4)
    emma = token_windows(tok, data.austen("emma"), 512, 16)
    base = perplexity(model, windows=evals, progress=False)
    rule = {"method": "int4", "mean_bits": 5.0}  # the menus only: its int4 option is the method's default
    _, menus = plan_mixed(model, plan(model, {pattern(k): rule for k in kinds}, has_calib=True), list(emma.split(4)),
                          progress=False)
    print(f"{'kind':10s} {'measured':>9s} {'estimated':>9s}")
    for kind in kinds:
        measured = float("nan")
        if not args.estimates_only:
            small, _ = rk.compress(model, {pattern(kind): {"method": "int4"}}, calib=emma, progress=False)
            measured = math.log(perplexity(small, windows=evals, progress=False) / base)
        estimated = sum(opts[0][1] for n, (_, opts) in menus.items() if n == kind or n.endswith("." + kind))
        print(f"{kind:10s} {measured:9.4f} {estimated:9.4f}", flush=True)


if __name__ == "__main__":
    main()
