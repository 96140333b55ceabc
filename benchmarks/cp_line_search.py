"""CP-ALS with and without its exact line search (compress/tensor_decomp.py), on the CPU.

Three cases, each run both ways (`line_search=False` / the default):
  * random exact rank-5 (9, 8, 7) tensors: how many stay in a swamp (relative error > 1e-6 after 1000
    sweeps), and the sweeps the others need;
  * the same with two collinear components (column 1 = column 0 + 0.3·noise, in every mode) at rank 4 —
    the textbook swamp;
  * a 576 × 576 weight with a decaying spectrum, tensorized two ways (CPLinear's use), 200 sweeps: the
    error reached and the seconds it took.

    python benchmarks/cp_line_search.py --out benchmarks/results/cpu/cp_line_search.json   # ~3 min, 1 thread
"""
import argparse
import json
import time
from pathlib import Path

import torch

from reparam_kernels.compress import tensor_decomp as td


def exact_rank(seed, shape, rank, collinear):
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for s in shape:
        a = torch.randn(s, rank, generator=gen, dtype=torch.float64)
        if collinear:
            a[:, 1] = a[:, 0] + collinear * a[:, 1]
        factors.append(a)
    return td.cp_to_tensor(factors)


def swamp_row(name, shape, rank, collinear, draws, line_search):
    stalls, sweeps, t0 = 0, [], time.perf_counter()
    for seed in range(draws):
        fit = td.cp_als(exact_rank(seed, shape, rank, collinear), rank, max_iter=1000, line_search=line_search)
        sweeps.append(fit.iterations)
        stalls += fit.rel_error > 1e-6
    sweeps.sort()
    return {"case": name, "line_search": line_search, "draws": draws, "stalled": stalls,
            "median_sweeps": sweeps[draws // 2], "p90_sweeps": sweeps[draws * 9 // 10],
            "seconds": round(time.perf_counter() - t0, 2)}


def weight_rows(sweeps):
    gen = torch.Generator().manual_seed(0)
    u, _, vt = torch.linalg.svd(torch.randn(576, 576, generator=gen, dtype=torch.float64))
    w = u @ torch.diag(torch.linspace(1, 0.01, 576, dtype=torch.float64) ** 2) @ vt
    cases = {"576x576 as (24,24,24,24), R=32": (w.reshape(24, 24, 24, 24), 32),
             "576x576 as (8,72,72,8), R=48": (w.reshape(8, 72, 8, 72).permute(0, 1, 3, 2).contiguous(), 48)}
    for name, (t, rank) in cases.items():
        for line_search in (False, True):
            t0 = time.perf_counter()
            fit = td.cp_als(t, rank, max_iter=sweeps, line_search=line_search)
            yield {"case": name, "line_search": line_search, "sweeps": fit.iterations,
                   "rel_error": round(fit.rel_error, 6), "seconds": round(time.perf_counter() - t0, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=600, help="random rank-5 tensors (the collinear case: a sixth)")
    ap.add_argument("--weight-sweeps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for line_search in (False, True):
        rows.append(swamp_row("exact rank 5, (9,8,7)", (9, 8, 7), 5, 0.0, args.draws, line_search))
        rows.append(swamp_row("exact rank 4, two collinear components, (9,8,7)", (9, 8, 7), 4, 0.3,
                              max(1, args.draws // 6), line_search))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    for row in weight_rows(args.weight_sweeps):
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/cp_line_search.py --out " + args.out,
                                          "threads": 1, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
