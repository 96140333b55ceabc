"""Does AWQ-style input-channel scaling help int4 g128 round to nearest beyond the weighted grid? (issue 3; measured)

    python benchmarks/quality_act_scale.py [--windows 4] [--alphas 0,0.25,0.5]

AWQ's equivalent transform: W' = W·diag(s) with s_k = (mean |x_k|)^α (normalized so max·min = 1),
W' quantized, and 1/s folded into whatever produces x (a norm's gain, the previous Linear's rows), so
the model computes x·diag(1/s)·Ŵ'ᵀ = x·(Ŵ'·diag(1/s))ᵀ. Large-input channels get a finer grid. Here W'
is quantized by the `int4` method's weighted grid (float zero, 11 x 11 clipping search weighted by each
input's mean square: e_k / s_k² after the scaling), the statistics are measured once on the dense model
with 16 x 512 random token ids (no data, as `compress(calib="random")`), and the layers keep their
weights replaced by the reconstruction Ŵ'·diag(1/s) — the fold itself is exact and not what is asked.
Rows: each fixed α for every layer, and per layer the α of the list with the lowest output error
tr(ΔW·XᵀX·ΔWᵀ) on the same random-token inputs (AWQ's search).
Writes benchmarks/results/quality/quant_act_scale.json.
"""
import argparse
import collections
import os

from quality_common import QualityRun

from reparam_kernels.compress.calib import random_tokens
from reparam_kernels.compress.quantize import dequantize_linear, quantize_linear


def scaled_int4(w, stats, alpha):
    """Ŵ'·diag(1/s) for W' = W·diag(s), s = abs_mean^alpha, on the energy-weighted int4 grid."""
    k = w.shape[1]
    s = stats.abs_mean.float().clamp(min=1e-8) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    q, scale, zero = quantize_linear(w * s, bits=4, group_size=128 if k % 128 == 0 else 64, symmetric=False,
                                     integer_zero=False, clip_steps=10, input_energy=stats.mean_square.float() / s ** 2)
    return dequantize_linear(q, scale, zero) / s


def output_error(w, wh, stats):
    d = (wh - w).double()
    return float(((d @ stats.gram) * d).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--alphas", default="0,0.25,0.5", help="comma-separated exponents; 0 = the weighted grid alone")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "quant_act_scale.json"))
    args = p.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    run = QualityRun(args.windows)
    stats = run.input_stats(random_tokens(run.model, n=16, seq_len=512, seed=0))
    for a in alphas:
        run.measure(f"alpha_{a:g}", lambda n, a=a: scaled_int4(run.dense[n], stats[n], a), alpha=a)
    chosen = {}

    def searched(n):
        cands = [(output_error(run.dense[n], wh, stats[n]), a, wh)
                 for a in alphas for wh in [scaled_int4(run.dense[n], stats[n], a)]]
        err, chosen[n], wh = min(cands, key=lambda c: c[0])
        return wh

    row = run.measure("alpha_searched_per_layer", searched, alphas=alphas)
    row["alpha_counts"] = {f"{a:g}": c for a, c in sorted(collections.Counter(chosen.values()).items())}
    run.write(args.out, calib="16 x 512 random token ids (seed 0), statistics of the dense model",
              quantized="every Linear in model.layers (lm_head dense), weights replaced by Ŵ'·diag(1/s): W·diag(s) "
                        "on the energy-weighted int4 grid (g128 / g64), s = mean|x|^alpha")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
