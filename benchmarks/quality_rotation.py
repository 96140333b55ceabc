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

import torch
from quality_common import QualityRun

from reparam_kernels.compress.quantize import dequantize_linear, quantize_linear


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
    run = QualityRun(args.windows)
    for mode, block in MODES.items():
        run.measure(mode, lambda name, b=block: quantized_weight(run.dense[name], b), hadamard_block=block)
    run.write(args.out, quantized="every Linear in model.layers (lm_head dense), weights replaced by their int4 "
                                  "round-to-nearest reconstruction (g128 / g64), with and without a Hadamard rotation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
