"""One call of each decode-path kernel, and of cuBLAS on the dense weight of the same shape, inside an
NVTX range "profile": the script the GPU runner puts under Nsight Compute (ncu) so that each kernel's
achieved DRAM bandwidth, occupancy and launch shape are on record next to the benchmark ratios.

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight ... python benchmarks/profile_ops.py

Warm-up calls happen outside the range, so only the measured call of each (layer, M) is profiled.
`--ring`: the quantized and low-rank kinds at M <= 64 are called once more with the small-M loop's
shared-memory ring switched on (REPARAM_SMALL_M_RING=1; its kernels are small_m_ring_kernel<..., false>
and lowrank_small_m_kernel<..., true>), int4 above M = 8 also with x in it (2: small_m_ring_kernel<...,
true>), so one profile compares them. Block-circulant at M <= 16 is called once more in eval mode, where
BlockCirculantLinear takes the tensor-core kernel on its blocks' columns (cols_kernel) instead of the FFT one.
`--x-ahead`: the quantized kinds at M <= 8 are called once more with the next stage's x prefetched into L1
(REPARAM_SMALL_M_X_AHEAD=1: the same kernel, small_m_kernel<..., 0, 4>, profiled twice, off then on).
`--post-scale`: int4_g128 at M <= 8 is called once more with its scales applied after the mma
(REPARAM_SMALL_M_POST_SCALE=1: small_m_kernel<Int4PostFrag<...>, ..., 0, 4>), after the x-ahead call if any.
`--device cpu` runs the same calls on the CPU (checks the script itself; no profile).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

RING_KINDS = ("int4_g128", "int8", "lut_log4", "lowrank_40", "lowrank_40_pivoted")
X_AHEAD_KINDS = ("int4_g128", "int8", "lut_log4", "vq_d2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reparam_kernels.bench import variants  # noqa: E402
from reparam_kernels.bench.cases import env_var  # noqa: E402
from reparam_kernels.cli.env import cuda_paths  # noqa: E402

# (kind, out_features, in_features): the DESIGN.md decode shapes, one per kind
SHAPES = [("int4_g128", 8192, 8192), ("int8", 8192, 8192), ("lowrank_40", 8192, 8192),
          ("lowrank_40_pivoted", 8192, 8192), ("lowrank40_int4", 8192, 8192), ("block_circulant_b256", 4096, 4096),
          ("lut_log4", 8192, 8192), ("vq_d2", 8192, 8192)]
SMALL = {"int4_g128": (512, 512), "int8": (512, 512), "lowrank_40": (512, 512), "lowrank_40_pivoted": (512, 512),
         "lowrank40_int4": (512, 512), "block_circulant_b256": (512, 512), "lut_log4": (256, 256),
         "vq_d2": (512, 512)}


def layer_for(kind, n, k, device, dtype):
    if kind == "lut_log4":  # no random builder: log-quantize a random weight (fast at this size)
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.float32)
        return variants.make(kind, lin).to(dtype)
    return variants.make_random(kind, k, n, bias=False, dtype=dtype, device=device)


def profiled(layer, x, cuda):
    """layer(x) once to warm up (a kernel's first launch), then once inside the NVTX range ncu profiles."""
    layer(x)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
    y = layer(x)
    if cuda:
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    return y


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--m", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(k for k, _, _ in SHAPES)}")
    p.add_argument("--ring", action="store_true", help="also call the small-M kinds with the shared-memory ring on")
    p.add_argument("--x-ahead", action="store_true",
                   help="also call the quantized kinds at M <= 8 with x prefetched into L1 a stage ahead")
    p.add_argument("--post-scale", action="store_true",
                   help="also call int4_g128 at M <= 8 with its scales applied after the mma")
    args = p.parse_args(argv)
    wanted = None if args.kinds is None else set(args.kinds.split(","))
    if wanted is not None and not wanted <= {k for k, _, _ in SHAPES}:
        raise SystemExit(f"profile_ops: unknown kinds {sorted(wanted - {k for k, _, _ in SHAPES})}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("profile_ops: needs a CUDA GPU (or --device cpu to check the script)")
    torch.manual_seed(0)
    dtype = torch.float16 if cuda else torch.float32
    kinds = set(variants.available())
    for kind, n, k in SHAPES:
        if wanted is not None and kind not in wanted:
            continue
        if kind not in kinds:
            print(f"profile_ops: {kind}: layer not available, skipped", flush=True)
            continue
        if not cuda:
            n, k = SMALL[kind]
        layer = layer_for(kind, n, k, args.device, dtype)
        w = torch.randn(n, k, device=args.device, dtype=dtype) * 0.02
        for m in (int(s) for s in args.m.split(",")):
            x = torch.randn(m, k, device=args.device, dtype=dtype)
            for _ in range(2):  # warm-up: autotuning, lazy loading, cuBLAS handles
                layer(x)
                F.linear(x, w)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push("profile")
            y = layer(x)
            ref = F.linear(x, w)
            if cuda:
                torch.cuda.nvtx.range_pop()
                torch.cuda.synchronize()
            print(f"profile_ops: {kind} {n}x{k} M={m}: out {tuple(y.shape)}, dense {tuple(ref.shape)}", flush=True)
            if kind.startswith("block_circulant") and m <= 16:  # eval mode: the columns (tensor-core) kernel
                y_eval = profiled(layer.eval(), x, cuda)
                layer.train()
                print(f"profile_ops: {kind} {n}x{k} M={m} eval: out {tuple(y_eval.shape)}", flush=True)
            if args.x_ahead and kind in X_AHEAD_KINDS and m <= 8:
                with env_var("REPARAM_SMALL_M_X_AHEAD", "1"):
                    y_x = profiled(layer, x, cuda)
                print(f"profile_ops: {kind} {n}x{k} M={m} x ahead: out {tuple(y_x.shape)}", flush=True)
            if args.post_scale and kind == "int4_g128" and m <= 8 and not cuda_paths()["small_m"]["post_scale_vetoed"]:
                with env_var("REPARAM_SMALL_M_POST_SCALE", "1"):
                    y_p = profiled(layer, x, cuda)
                print(f"profile_ops: {kind} {n}x{k} M={m} post-scale: out {tuple(y_p.shape)}", flush=True)
            modes = ("1", "2") if kind == "int4_g128" and m > 8 else ("1",)  # 2: x in the ring too (int4, M > 8)
            for mode in modes if args.ring and kind in RING_KINDS and m <= 64 else ():
                if cuda_paths()["small_m"]["ring_vetoed"]:  # switched off by the runner
                    break
                with env_var("REPARAM_SMALL_M_RING", mode):
                    y_ring = profiled(layer, x, cuda)
                print(f"profile_ops: {kind} {n}x{k} M={m} ring {mode}: out {tuple(y_ring.shape)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
