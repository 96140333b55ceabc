"""The default recipe with the Fisher's labels from the text (the empirical Fisher, the default) or sampled from
the model (the true Fisher, `output_fisher(labels="sampled")`), on SmolLM2 (an exploration, docs/quant.md
§ lm_head too)

    python benchmarks/explore_fisher_labels.py [--rows text,sampled:0,sampled:1,random-text,random-sampled:0]

A row is LABELS[:SEED], "random-" in front for calibration on 16 x 512 random token ids instead of 16 x 256
tokens of Emma (the default recipe's); each compresses with the default recipe and evaluates 4 windows of
Pride and Prejudice (~4-7 min a row on 2 CPU cores). The mean_bits rows with sampled labels come from
`quality_mixed_bits.py --fisher-labels sampled`. Writes benchmarks/results/quality/fisher_labels.json.
"""
import argparse
import os
import time

from quality_common import QualityRun

import reparam_kernels as rk
from reparam_kernels import data
from reparam_kernels.compress import fisher
from reparam_kernels.evaluate import perplexity, token_windows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="text,sampled:0,sampled:1,random-text,random-sampled:0")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "fisher_labels.json"))
    args = p.parse_args(argv)
    run = QualityRun(4)
    emma = token_windows(run.tok, data.austen("emma"), 256, 16)
    for row in args.rows.split(","):
        calib = "random" if row.startswith("random-") else emma
        labels, _, seed = row.removeprefix("random-").partition(":")
        fisher.DEFAULT_LABELS, fisher.SEED = labels, int(seed or 0)
        t0 = time.perf_counter()
        small, _ = rk.compress(run.model, "default", calib=calib, progress=False)
        run.add_row(f"default, {row}", perplexity(small, windows=run.evals, progress=False), t0,
                    calib="random 16 x 512" if calib == "random" else "Emma 16 x 256", fisher_labels=labels,
                    **({"seed": fisher.SEED} if labels == "sampled" else {}))
    run.write(args.out, recipe="default (Fisher-weighted whitened low rank, global ranks, pivoted, -20%)")


if __name__ == "__main__":
    main()
