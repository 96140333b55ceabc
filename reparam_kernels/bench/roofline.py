"""Roofline plot of benchmark rows against the ceilings measured in the same run.

x: arithmetic intensity (flops per byte the op must move); y: achieved TFLOP/s.
The roof is min(copy bandwidth x intensity, bf16 GEMM throughput): a memory-bound
op (decode, M small) sits on the sloped part, where its height / intensity is its
achieved TB/s. Only rows carrying `bytes` and `flops` can be placed.
"""
import os

from .results import achieved


def plottable(data, mode="graph"):
    """(intensity, tflops, tbps, label) of each row of `mode` that carries bytes and flops."""
    pts = []
    for r in data["rows"]:
        if r["mode"] != mode or not r.get("bytes") or not r.get("flops"):
            continue
        tbps, tflops = achieved(r)
        label = f"{r['op']} {r['dtype']} M={r['M']}"
        pts.append((r["flops"] / r["bytes"], tflops, tbps, label))
    return pts


def plot(datas, path, mode="graph"):
    """Write a roofline PNG for result dicts `datas` (one GPU); returns the path, or None without points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = next((d["ceilings"] for d in datas if d.get("ceilings")), None)
    series = [(d["rows"][0]["op"], plottable(d, mode)) for d in datas if d["rows"]]
    series = [(op, pts) for op, pts in series if pts]
    if not series or ceilings is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [p[0] for _, pts in series for p in pts]
    lo, hi = min(xs) / 2, max(max(xs) * 2, 2 * ceilings["bf16_gemm_tflops"] / ceilings["copy_tbps"])
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(ceilings["copy_tbps"] * x, ceilings["bf16_gemm_tflops"]) for x in grid], "k-",
            label=f"roof: copy {ceilings['copy_tbps']:.2f} TB/s, bf16 GEMM {ceilings['bf16_gemm_tflops']:.0f} TFLOP/s")
    for op, pts in series:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=op)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte the op must move)")
    ax.set_ylabel("achieved TFLOP/s (kernel-only)")
    ax.set_title(f"{datas[0]['gpu']}: ops vs ceilings measured in the same run ({mode})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
