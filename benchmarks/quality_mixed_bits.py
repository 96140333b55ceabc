"""int4 with int8 where the loss cares most, under one size budget (`mean_bits`), on SmolLM2 (issue 3; measured)

    python benchmarks/quality_mixed_bits.py [--windows 4] [--bits 4.75,5,5.378,6] [--text-bits 5.378]
                                            [--gptq-bits 5] [--corrected-bits 5] [--corrected-gptq-bits 5]
                                            [--only-extra] [--lm-head] [--update] [--fisher-labels sampled]

Every row runs the real `compress` on every Linear of model.layers, then perplexity on Pride and Prejudice:
  int4              int4 g128 weighted grid everywhere (the built-in `int4` recipe)
  down_int8         the usual hand-written mix: every down_proj int8, the rest int4
  mean_bits_B       `int4` with `mean_bits: B`: the Fisher-estimated loss per bit chooses the int8 layers
                    (compress/allocate_bits.py); calibrated on 16 x 512 random token ids (no data)
  mean_bits_B_text  the same, calibrated on 16 x 512 tokens of Emma
  mean_bits_B_gptq_text  the same with `gptq: true` (the int4 layers GPTQ'd, act order)
  mean_bits_B_corrected_text  `mean_bits: B, correction_rank: auto`: int4 layers may also take a low-rank
                    correction of their error, the budget choosing each rank (calibrated on Emma)
  mean_bits_B_corrected_gptq_text  the same with `gptq: true`
With --lm-head the mean_bits rows put lm_head (49152 x 576, tied to the embedding, which keeps the dense
weight) in the same rule, so its int4 / int8 choice shares the budget; their rows end in "+lm_head".
`decode_mb` is what a decode step reads of all 211 Linears (lm_head at 16 bits where it stays dense).
--fisher-labels: the labels of the Fisher pass behind mean_bits (compress/fisher.py; default its DEFAULT_LABELS).
Bits per weight count scales and zeros at 16 bits (deployed fp16 / bf16), whatever dtype the model is in.
Writes benchmarks/results/quality/mixed_bits.json.
"""
import argparse
import json
import os
import time

from quality_common import QualityRun

import reparam_kernels as rk
from reparam_kernels import data
from reparam_kernels.compress import fisher
from reparam_kernels.compress.allocate_bits import deployed_bits
from reparam_kernels.compress.calib import random_tokens
from reparam_kernels.evaluate import perplexity, token_windows

ALL = "model.layers.*"


def measure(run, name, recipe, ids, **fields):
    t0 = time.perf_counter()
    small, report = rk.compress(run.model, recipe, calib=ids, progress=False)
    layers = [small.get_submodule(r.name) for r in report.layers]
    params = sum(r.shape[0] * r.shape[1] for r in report.layers)
    bits = sum(deployed_bits(m) for m in layers) / params
    head = 0 if any(r.name == "lm_head" for r in report.layers) else 16 * small.lm_head.weight.numel()
    decode_mb = (sum(deployed_bits(m) for m in layers) + head) / 8e6
    int8 = sorted(r.name for r in report.layers if r.method == "int8")
    ranks = {r.name: r.settings["correction_rank"] for r in report.layers if r.settings.get("correction_rank")}
    ppl = perplexity(small, windows=run.evals, progress=False, desc=name)
    print(f"{name}: {bits:.3f} bits/weight, {len(int8)} int8 layers, {len(ranks)} corrected", flush=True)
    run.add_row(name, ppl, t0, **fields, bits_per_weight=bits, decode_mb=decode_mb, int8_layers=len(int8), int8=int8,
                **({"corrected_layers": len(ranks), "correction_ranks": ranks} if ranks else {}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--bits", default="4.75,5,5.378,6", help="mean_bits budgets calibrated on random tokens "
                                                             "(5.378: what down_int8 takes)")
    p.add_argument("--text-bits", default="5.378", help="mean_bits budgets calibrated on Emma")
    p.add_argument("--gptq-bits", default="5", help="mean_bits budgets with gptq=true, calibrated on Emma")
    p.add_argument("--corrected-bits", default="", help="mean_bits budgets with correction_rank: auto, calibrated "
                                                         "on Emma")
    p.add_argument("--corrected-gptq-bits", default="", help="the same with gptq: true")
    p.add_argument("--only-extra", action="store_true", help="skip the int4 and down_int8 rows")
    p.add_argument("--lm-head", action="store_true", help="mean_bits rows: lm_head in the same rule (and budget)")
    p.add_argument("--update", action="store_true", help="keep the rows of --out this run does not measure")
    p.add_argument("--fisher-labels", choices=fisher.LABELS, default=fisher.DEFAULT_LABELS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "mixed_bits.json"))
    args = p.parse_args(argv)
    fisher.DEFAULT_LABELS = args.fisher_labels
    run = QualityRun(args.windows)
    rnd = random_tokens(run.model, n=16, seq_len=512, seed=0)
    emma = token_windows(run.tok, data.austen("emma"), 512, 16)
    if not args.only_extra:
        measure(run, "int4", {ALL: "int4"}, rnd, calib="random")
        measure(run, "down_int8", {"model.layers.*.mlp.down_proj": "int8", ALL: "int4"}, rnd, calib="random")
    head, tag = (["lm_head"], "+lm_head") if args.lm_head else ([], "")

    def mean_bits(b, suffix, ids, calib, **rule):
        r = {"method": "int4", "mean_bits": b, **rule}
        measure(run, f"mean_bits_{b:g}{suffix}{tag}", {p: r for p in [ALL] + head}, ids, calib=calib, mean_bits=b,
                fisher_labels=args.fisher_labels, **rule, **({"lm_head": True} if head else {}))

    for b in [float(x) for x in args.bits.split(",") if x]:
        mean_bits(b, "", rnd, "random")
    for b in [float(x) for x in args.text_bits.split(",") if x]:
        mean_bits(b, "_text", emma, "emma")
    for b in [float(x) for x in args.gptq_bits.split(",") if x]:
        mean_bits(b, "_gptq_text", emma, "emma", gptq=True)
    for gptq, budgets in ((False, args.corrected_bits), (True, args.corrected_gptq_bits)):
        for b in [float(x) for x in budgets.split(",") if x]:
            extra = {"gptq": True} if gptq else {}
            mean_bits(b, f"_corrected{'_gptq' if gptq else ''}_text", emma, "emma", correction_rank="auto", **extra)
    if args.update and os.path.exists(args.out):
        with open(args.out) as f:
            new = {r["method"] for r in run.rows}
            run.rows = run.rows[:1] + [r for r in json.load(f)["rows"] if r["method"] not in new] + run.rows[1:]
    run.write(args.out, calib="16 x 512 tokens: random ids (seed 0) or Emma",
              quantized="every Linear of model.layers (and lm_head in the rows marked lm_head)",
              bits="scales and zero points counted at 16 bits")


if __name__ == "__main__":
    main()
