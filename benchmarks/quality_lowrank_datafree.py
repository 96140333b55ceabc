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

import torch
from quality_common import QualityRun

from reparam_kernels import data
from reparam_kernels.compress.calib import CalibStats, random_tokens
from reparam_kernels.compress.svd import truncated_svd, whitened_svd
from reparam_kernels.evaluate import token_windows


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
    run = QualityRun(args.windows)

    def measure(name, factor, **settings):
        def product(n):  # each weight replaced by u·v of its factorization
            u, v, _ = factor(n, run.dense[n])
            return u.float() @ v.float()
        run.measure(name, product, **settings)

    measure("plain_svd", lambda n, w: truncated_svd(w, ratio=args.ratio), calib=None)
    calibs = {"random": random_tokens(run.model, n=16, seq_len=512, seed=0),
              "emma": token_windows(run.tok, data.austen("emma"), window=512, max_windows=16)}
    for cname, ids in calibs.items():
        stats = run.input_stats(ids)
        measure(f"whitened_{cname}", lambda n, w: whitened_svd(w, stats[n], ratio=args.ratio), calib=cname)
        for power in (0.5, 0.25):
            measure(f"diagonal_e{power:g}_{cname}",
                    lambda n, w, pw=power: whitened_svd(w, diagonal_stats(stats[n], pw), ratio=args.ratio),
                    calib=cname, power=power)
    run.write(args.out, calib="16 x 512 random token ids (seed 0) or 16 x 512 tokens of Emma, statistics of the dense model",
              compressed=f"every Linear in model.layers replaced by u·v, ratio {args.ratio} removed per layer "
                         "(plain factors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
