"""Time of the factorizations compress() runs per Linear — whitened SVD (Gram Cholesky, W·S, eigh,
triangular solve, balance) and the pivoted factors — on a GPU (float64, svd.factor_device) and on the CPU.

Shapes are Llama-3-8B's (q/o 4096², gate/up 14336×4096, down 4096×14336) divided by --scale; the
rank is what ratio 0.2 of pivoted storage buys. Writes JSON rows (device, shape, seconds per stage).

    python benchmarks/factor_time.py --device cuda            # the 8B shapes on the GPU
    python benchmarks/factor_time.py --device cpu --scale 4   # 1/64 of the work, on the CPU
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from reparam_kernels.compress import svd
from reparam_kernels.compress.calib import CalibStats
from reparam_kernels.nn.pivoted import pivot_factors

SHAPES = {"q_proj": (4096, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(out_f, in_f, device, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, 256, generator=g) @ torch.randn(256, in_f, generator=g) / 16
         + 0.1 * torch.randn(out_f, in_f, generator=g)).to(device)
    stats = CalibStats(in_f, device)
    for _ in range(max(1, rows // 1024)):
        stats.add(torch.randn(1024, in_f, generator=g).to(device) * torch.logspace(-1, 1, in_f).to(device))
    rank = svd.pivoted_rank_for_ratio(out_f, in_f, 0.2)
    row = {"device": str(device), "shape": [out_f, in_f], "rank": rank}
    _sync(device)
    t = time.perf_counter()
    u, v, _ = svd.whitened_svd(W, stats, rank=rank)
    _sync(device)
    row["whitened_svd_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    pivot_factors(u, v)
    _sync(device)
    row["pivot_s"] = round(time.perf_counter() - t, 3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (o, i) in SHAPES.items():
        time_layer(max(o // args.scale // 8, 64), max(i // args.scale // 8, 64), device)  # warm-up (cusolver, MKL)
        row = {"layer": name, **time_layer(o // args.scale, i // args.scale, device)}
        row["factor_device"] = str(svd.factor_device(torch.empty(0, device=device)))
        row["threads"] = torch.get_num_threads()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "env": {
            "torch": torch.__version__, "REPARAM_FACTOR_DEVICE": os.environ.get("REPARAM_FACTOR_DEVICE"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}, indent=1))


if __name__ == "__main__":
    main()
