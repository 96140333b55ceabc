"""Call every op once on the GPU, small, through every layer type and every kernel path: the script
the GPU runner puts under `compute-sanitizer --tool memcheck` (all of it) and `--tool racecheck`
(`--paths-only`: the paths with shared-memory reductions and split fixups). Usable on its own.

Exits 1 if an op that has a CUDA kernel was not exercised or a result is wrong.
"""
import argparse
import contextlib
import os
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reparam_kernels import _dispatch  # noqa: E402
from reparam_kernels.bench import variants  # noqa: E402
from reparam_kernels.bench.cases import env_var  # noqa: E402
from reparam_kernels.cli.env import cuda_paths  # noqa: E402


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "reparam":
            self.seen.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


class GroupedProbe(nn.Module):
    """E int4, int8, GPTVQ, log 4-bit or low-rank experts of K -> N as one grouped op call (csrc/grouped_quant.cuh,
    csrc/grouped_lowrank_linear.cu on the GPU): the M rows of x split between experts 0 and 2 (expert 1 none, the
    last row no expert's); reference() is the per-expert float64 product. GPTVQ: random codes, 256 pairs a codebook
    per 64 rows (the recipe's layout); log 4-bit: random codes, a 16-entry table a row; low rank: pivoted factors of
    ranks 24, 0, 136, ... (multiples of 8: the CUDA loop; one past a 128-column block)."""

    def __init__(self, fmt, K, N, dtype, device, experts=3):
        super().__init__()
        from reparam_kernels import nn as rnn, ops
        from reparam_kernels.reference.lut_linear import dequantize_lut
        from reparam_kernels.reference.vq_linear import dequantize_vq

        self.in_features, self.consts = K, ()
        self.op = {"int4": ops.grouped_int4_linear, "int8": ops.grouped_int8_linear, "gptvq": ops.grouped_vq_linear,
                   "log4": ops.grouped_lut_linear, "lowrank": ops.grouped_lowrank_linear}[fmt]
        if fmt == "lowrank":
            from reparam_kernels.ops.grouped_lowrank_linear import stack_factors
            from reparam_kernels.reference.pivoted_lowrank_linear import expand_right_factor
            ranks = [(24, 0, 136)[e % 3] for e in range(experts)]
            us = [(torch.randn(N, r, device=device) / max(r, 1) ** 0.5).to(dtype) for r in ranks]
            ws = [(torch.randn(r, K - r, device=device) / K ** 0.5).to(dtype) for r in ranks]
            perms = [torch.randperm(K, device=device) for _ in ranks]
            u, v, perm, fo, max_rank, align = stack_factors(us, ws, perms)
            self.stacked, self.consts = [u, v, perm, fo], (N, max_rank, align)
            self.stacked_bias = torch.randn(experts, N, device=device).to(dtype)
            self.dense = [ue.double() @ expand_right_factor(we, pe, torch.float64) for ue, we, pe in zip(us, ws, perms)]
            return
        if fmt in ("gptvq", "log4"):  # random codes, a byte a pair (gptvq) or two 4-bit codes (log4)
            codes = torch.randint(0, 256, (experts, N, K // 2), device=device, dtype=torch.uint8)
            shape, dequantize = ((N // 64, 256, 2), dequantize_vq) if fmt == "gptvq" else ((N, 16), dequantize_lut)
            tables = (torch.randn(experts, *shape, device=device) * 0.05).to(dtype)
            self.stacked = [codes, tables]
            self.stacked_bias = torch.randn(experts, N, device=device).to(dtype)
            self.dense = [dequantize(codes[e], tables[e], torch.float64) for e in range(experts)]
            return

        def one():
            dense = nn.Linear(K, N, bias=True).to(device=device, dtype=dtype)
            return (rnn.Int4Linear.from_linear(dense, group_size=128) if fmt == "int4" else
                    rnn.Int8Linear.from_linear(dense))
        layers = [one() for _ in range(experts)]
        if fmt == "int4":
            self.consts = (layers[0].group_size,)
        names = ("qweight", "scales", "zeros") if fmt == "int4" else ("qweight", "scales")
        self.stacked = [torch.stack([getattr(e, n) for e in layers]) for n in names]
        self.stacked_bias = torch.stack([e.bias for e in layers])
        self.dense = [e.to_dense().double() for e in layers]

    def offsets(self, m, device):
        half = (m - 1) // 2
        return torch.tensor([0, half, half, m - 1] + [m - 1] * (len(self.dense) - 3), device=device)

    def forward(self, x):
        return self.op(x, self.offsets(x.shape[0], x.device), *self.stacked, *self.consts, self.stacked_bias)

    def reference(self, x):
        bounds = self.offsets(x.shape[0], x.device).tolist()
        y = torch.zeros(x.shape[0], self.stacked_bias.shape[1], dtype=torch.float64, device=x.device)
        for e, w in enumerate(self.dense):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                y[lo:hi] = x[lo:hi].double() @ w.t() + self.stacked_bias[e].double()
        return y


def path_cases():
    """(name, layer factory(dtype, device), batches): the shapes that take each CUDA path besides the
    variants' own: register-fed small M with K split over CTAs (int8, int4, both low-rank forms; ranks in
    multiples of 8), wgmma at 64 < M < 129 (Hopper; the cases here up to 512), the cuBLAS routes
    (quantized M >= 129, low rank at every M by default, pivoted from M = 2: the low-rank kernel cases here
    turn that off to reach the fused kernels), and the block-circulant large-M and columns (decode) kernels."""
    from reparam_kernels import nn as rnn

    def lin(k, n, dtype, device):
        return nn.Linear(k, n, bias=True).to(device=device, dtype=dtype)

    return [
        # M <= 8: the small-M path's transposed tile (smoke-tested on its own first by run_gpu.sh)
        ("int4 transposed small-M", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1024, 72, dt, dev), group_size=128),
         (3,)),
        ("lowrank transposed small-M", lambda dt, dev: rnn.LowRankLinear.from_linear(lin(1024, 200, dt, dev), rank=64),
         (3,)),
        ("int8 small-M split", lambda dt, dev: rnn.Int8Linear.from_linear(lin(1024, 72, dt, dev)), (1, 40)),
        ("int4 small-M split", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1024, 72, dt, dev), group_size=128),
         (1, 40)),
        ("lut small-M split", lambda dt, dev: rnn.LUTLinear.from_linear(lin(1024, 72, dt, dev), method="log", bits=4),
         (1, 40)),
        # VQ pairs (GPTVQ's format, vq_linear): codebooks per 64 rows staged in shared memory, two per column block;
        # then the general path's dequantize + cuBLAS ("vq-pairs": run_gpu.sh smoke-tests them apart from the
        # other formats' small-M and dequantize cases, with a switch of their own, REPARAM_VQ_SMALL_M)
        ("vq-pairs split", lambda dt, dev: rnn.LUTLinear.from_linear(lin(1024, 256, dt, dev), method="vq", d=2, bits=8,
                                                                       rows_per_codebook=64, iters=2), (1, 40)),
        ("vq-pairs large-M", lambda dt, dev: rnn.LUTLinear.from_linear(lin(256, 72, dt, dev), method="vq", d=2, bits=8,
                                                                        iters=2), (600,)),
        # the quantized small-M loop with its weights through the shared-memory ring (REPARAM_SMALL_M_RING,
        # off by default; smoke-tested on its own by run_gpu.sh): the transposed, M <= 16 and M <= 64 tiles;
        # "ring+x": x through it too (2)
        ("int4 small-M ring", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1056, 72, dt, dev), group_size=32),
         (1, 12, 40)),
        ("int4 small-M ring+x", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1056, 72, dt, dev), group_size=32),
         (12, 40)),
        ("int8 small-M ring", lambda dt, dev: rnn.Int8Linear.from_linear(lin(1056, 72, dt, dev)), (1, 12, 40)),
        ("int8 small-M ring+x", lambda dt, dev: rnn.Int8Linear.from_linear(lin(1056, 72, dt, dev)), (12, 40)),
        ("lut small-M ring", lambda dt, dev: rnn.LUTLinear.from_linear(lin(1056, 72, dt, dev), method="log", bits=4),
         (1, 12, 40)),
        ("lut small-M ring+x", lambda dt, dev: rnn.LUTLinear.from_linear(lin(1056, 72, dt, dev), method="log", bits=4),
         (12, 40)),
        # the register loop with x prefetched into L1 a stage ahead (REPARAM_SMALL_M_X_AHEAD=1) and with stream-K
        # (REPARAM_SMALL_M_STREAM_K=1; 160 column blocks of 5 or 9 stages, the last partial: the even split runs 160
        # CTAs on an H200's 264 slots), both off by default and smoke-tested on their own by run_gpu.sh; the rings
        # off, so M = 12 runs the register loop too
        ("int4 x-ahead", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1056, 72, dt, dev), group_size=32), (1, 5, 12)),
        ("lut x-ahead", lambda dt, dev: rnn.LUTLinear.from_linear(lin(1056, 72, dt, dev), method="log", bits=4), (1, 12)),
        ("int4 stream-K", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1088, 20480, dt, dev), group_size=64),
         (1, 5, 12)),
        ("int8 stream-K", lambda dt, dev: rnn.Int8Linear.from_linear(lin(1088, 20480, dt, dev)), (1, 12)),
        # int4's scales applied after the mma (REPARAM_SMALL_M_POST_SCALE=1, off by default, smoke-tested on its own
        # by run_gpu.sh): the transposed tile, groups of 128 and 256, a partial last stage (K = 1152 = 9 x 128)
        ("int4 post-scale", lambda dt, dev: rnn.Int4Linear.from_linear(lin(1152, 200, dt, dev), group_size=128),
         (1, 5, 8)),
        ("int4 post-scale g256", lambda dt, dev: rnn.Int4Linear.from_linear(lin(2048, 72, dt, dev), group_size=256),
         (1, 3)),
        ("lowrank small-M", lambda dt, dev: rnn.LowRankLinear.from_linear(lin(1024, 200, dt, dev), rank=64), (1, 40)),
        ("lowrank two-GEMM", lambda dt, dev: rnn.LowRankLinear.from_linear(lin(256, 72, dt, dev), rank=32), (600,)),
        # both forms at M <= 8 as two GEMVs in one launch (REPARAM_LOWRANK_GEMV=1, off by default, smoke-tested on
        # its own by run_gpu.sh): K off the 256-element load row, several K splits, u staged in shared memory
        ("lowrank gemv", lambda dt, dev: rnn.LowRankLinear.from_linear(lin(1000, 200, dt, dev), rank=64), (1, 3, 8)),
        ("pivoted gemv", lambda dt, dev: rnn.PivotedLowRankLinear.from_linear(lin(1000, 200, dt, dev), rank=64),
         (1, 3, 8)),
        ("pivoted small-M", lambda dt, dev: rnn.PivotedLowRankLinear.from_linear(lin(1024, 200, dt, dev), rank=64),
         (1, 40)),
        ("int4 dequant+cuBLAS", lambda dt, dev: rnn.Int4Linear.from_linear(lin(256, 72, dt, dev), group_size=128),
         (600,)),
        # the same a piece of rows at a time (REPARAM_DEQUANT_SCRATCH_MB=0.05 here; by default only weights over
        # 256 MB): 4000 rows in pieces of 2048 on an H200 at M = 600 (the pieces' GEMMs fill its SMs), the last one
        # shorter; y's columns and the bias narrowed per piece
        ("int4 dequant-pieces", lambda dt, dev: rnn.Int4Linear.from_linear(lin(256, 4000, dt, dev), group_size=128),
         (600,)),
        ("int8 dequant-pieces", lambda dt, dev: rnn.Int8Linear.from_linear(lin(256, 4000, dt, dev)), (600,)),
        # 64 < M < 512 on Hopper (elsewhere these take the WMMA tiles): 1 and 2 batch tiles, a partial row block
        ("int4 wgmma", lambda dt, dev: rnn.Int4Linear.from_linear(lin(384, 200, dt, dev), group_size=128), (100, 200)),
        ("int8 wgmma", lambda dt, dev: rnn.Int8Linear.from_linear(lin(384, 200, dt, dev)), (100,)),
        ("lut wgmma", lambda dt, dev: rnn.LUTLinear.from_linear(lin(384, 200, dt, dev), method="log", bits=4), (100,)),
        ("lowrank wgmma", lambda dt, dev: rnn.LowRankLinear.from_linear(lin(1024, 200, dt, dev), rank=64), (100,)),
        ("pivoted wgmma", lambda dt, dev: rnn.PivotedLowRankLinear.from_linear(lin(1024, 200, dt, dev), rank=64),
         (100,)),
        ("pivoted two-GEMM", lambda dt, dev: rnn.PivotedLowRankLinear.from_linear(lin(256, 72, dt, dev), rank=32),
         (600,)),
        # the same at small M: x's columns gathered rather than w expanded (3 M <= 2 r; csrc/lowrank_large_m.cuh)
        ("pivoted two-GEMM gather", lambda dt, dev: rnn.PivotedLowRankLinear.from_linear(lin(1000, 200, dt, dev),
                                                                                          rank=64), (2, 16, 40)),
        # M >= 64: spectrum sums in registers (csrc/block_circulant_large_m.cuh; b = 256 in fp16 / bf16: its FFTs on
        # tensor cores, csrc/fft_mma.cuh); a row tail, N and K off the blocks
        ("block-circulant large-M", lambda dt, dev: rnn.BlockCirculantLinear.from_linear(lin(1000, 700, dt, dev), 256),
         (1030,)),
        # M <= 16 in eval mode: the tensor-core kernel on the blocks' first columns (block_circulant_cols_linear),
        # split K fixed up by the last CTA; a block wider than a chunk, N and K off the blocks, two row groups
        ("block-circulant cols", lambda dt, dev: rnn.BlockCirculantLinear.from_linear(lin(1000, 700, dt, dev), 512).eval(),
         (1, 12)),
        # the same in 8-row CTA tiles above M = 8 (REPARAM_BC_COLS_TILE_ROWS=8, off by default): two row tiles, the last
        # partial
        ("block-circulant cols-8-rows", lambda dt, dev: rnn.BlockCirculantLinear.from_linear(lin(1000, 700, dt, dev),
                                                                                              512).eval(), (12,)),
        # one wide CTA a tile, K split among its warps (REPARAM_BC_COLS_WIDE=1, off by default): 11 tiles of 9
        # chunks, 16 warps at one row (7 idle), 8 at 12 rows (2 chunks for warp 0)
        ("block-circulant cols-wide", lambda dt, dev: rnn.BlockCirculantLinear.from_linear(lin(2100, 700, dt, dev),
                                                                                            512).eval(), (1, 12)),
        # a MoE layer's experts in one launch (csrc/grouped_quant.cuh): the small-M loop per expert with K split,
        # the transposed tile at 3 rows, 64-row chunks past 64 ("grouped": run_gpu.sh smoke-tests it apart, with
        # its own switch REPARAM_GROUPED_SMALL_M)
        ("grouped int4 experts", lambda dt, dev: GroupedProbe("int4", 1024, 72, dt, dev), (3, 40, 150)),
        ("grouped int8 experts", lambda dt, dev: GroupedProbe("int8", 1024, 72, dt, dev), (3, 40, 150)),
        ("grouped gptvq experts", lambda dt, dev: GroupedProbe("gptvq", 1024, 192, dt, dev), (3, 40, 150)),
        ("grouped log4 experts", lambda dt, dev: GroupedProbe("log4", 1024, 72, dt, dev), (3, 40, 150)),
        ("grouped lowrank experts", lambda dt, dev: GroupedProbe("lowrank", 1024, 72, dt, dev), (3, 40, 150)),
    ]


def check(name, layer, m, k_in, dtype, device, recorder, bad):
    """Runs layer on a fresh x of m rows; appends to `bad` when it disagrees with its to_dense()."""
    dense = layer.to_dense().double() if hasattr(layer, "to_dense") else None
    x = torch.randn(m, k_in, device=device, dtype=dtype)
    with recorder:
        y = layer(x)
    if device == "cuda":
        torch.cuda.synchronize()
    if dense is not None or hasattr(layer, "reference"):
        ref = layer.reference(x) if hasattr(layer, "reference") else (
            x.double() @ dense.t() + (layer.bias.double() if getattr(layer, "bias", None) is not None else 0))
        err = float((y.double() - ref).norm() / ref.norm())
        if not err < 5e-2:
            bad.append(f"{name} {dtype} M={m}: relative error {err:.3g} against to_dense()")


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script itself")
    p.add_argument("--paths-only", action="store_true",
                   help="only the path cases (small-M splits, cuBLAS routes): the short run for racecheck")
    p.add_argument("--match", default="", help="with --paths-only: only the path cases whose name contains this")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sanitize_ops: needs a CUDA GPU")
    torch.manual_seed(0)
    bad = []
    recorder = RecordOps()
    dtypes = (torch.float16, torch.bfloat16)
    for kind in ([] if args.paths_only else variants.available()):
        for dtype in dtypes:
            layer = variants.make(kind, nn.Linear(256, 192, bias=True).to(device=device, dtype=dtype))
            for m in (1, 17):
                check(kind, layer, m, 256, dtype, device, recorder, bad)
            print(f"sanitize_ops: {kind} {str(dtype)[6:]} ok", flush=True)
    for name, make, batches in path_cases():
        if args.paths_only and args.match not in name:
            continue
        # the fused low-rank kernels at every M (by default two cuBLAS products take plain factors at every M); the
        # two-GEMM cases keep the default
        fused = name.startswith(("lowrank", "pivoted")) and "two-GEMM" not in name
        # the ring cases switch the ring on, unless it is switched off outright (run_gpu.sh after a failed smoke run)
        ring = "1" if name.endswith(" ring") else "2" if name.endswith(" ring+x") else None
        if cuda_paths()["small_m"]["ring_vetoed"]:
            ring = None
        for dtype in dtypes:
            layer = make(dtype, device)
            with contextlib.ExitStack() as stack:
                if fused:
                    stack.enter_context(env_var("REPARAM_LOWRANK_CUBLAS_MIN_M", "0"))
                if name.endswith(" wgmma"):  # two batch tiles too (by default M >= 129 dequantizes)
                    stack.enter_context(env_var("REPARAM_DEQUANT_MIN_M", "512"))
                if ring:
                    stack.enter_context(env_var("REPARAM_SMALL_M_RING", ring))
                if name.endswith(" dequant-pieces") and os.environ.get("REPARAM_DEQUANT_SCRATCH_MB", "") != "0":
                    stack.enter_context(env_var("REPARAM_DEQUANT_SCRATCH_MB", "0.05"))  # (0: vetoed by a smoke run)
                if name.endswith(" cols-8-rows") and os.environ.get("REPARAM_BC_COLS_TILE_ROWS", "") != "0":
                    stack.enter_context(env_var("REPARAM_BC_COLS_TILE_ROWS", "8"))  # (0: vetoed by a smoke run)
                for suffix, var in ((" x-ahead", "REPARAM_SMALL_M_X_AHEAD"), (" stream-K", "REPARAM_SMALL_M_STREAM_K"),
                                    (" cols-wide", "REPARAM_BC_COLS_WIDE"),
                                    (" post-scale", "REPARAM_SMALL_M_POST_SCALE"),
                                    (" post-scale g256", "REPARAM_SMALL_M_POST_SCALE"), (" gemv", "REPARAM_LOWRANK_GEMV")):
                    if name.endswith(suffix) and os.environ.get(var, "") != "0":  # (0: vetoed by a smoke run)
                        stack.enter_context(env_var(var, "1"))
                        stack.enter_context(env_var("REPARAM_SMALL_M_RING", "0"))
                for m in batches:
                    check(name, layer, m, layer.in_features, dtype, device, recorder, bad)
            print(f"sanitize_ops: {name} {str(dtype)[6:]} ok", flush=True)
    if not args.paths_only:
        with_kernel = {op for op in _dispatch.REGISTRY
                       if _dispatch.backend_for(op, "cuda", torch.float16)[0] == "cuda"}
        # BlockCirculantLinear takes block_circulant_cols_linear for CUDA inputs only (eval mode, M <= 16): on
        # the CPU (the script's own check) no layer reaches it
        cuda_only = {"block_circulant_cols_linear"} if device != "cuda" else set()
        missed = sorted(with_kernel - recorder.seen - cuda_only)
        print(f"sanitize_ops: ops called: {sorted(recorder.seen)}; CUDA-kernel ops: {sorted(with_kernel)}")
        if missed:
            bad.append(f"CUDA-kernel ops not exercised by any layer: {missed}")
    for b in bad:
        print("sanitize_ops: FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
