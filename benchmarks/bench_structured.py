"""Block-circulant and Toeplitz linear vs cuBLAS dense F.linear vs the torch.fft path, in one run.

    python benchmarks/bench_structured.py [--quick] [--blocks 256,1024,4096] [--dtypes fp16,bf16]

Writes benchmarks/results/<gpu>/block_circulant_linear.json and toeplitz_linear.json
(DESIGN.md format). Per case (M, N, K, block b):

* ours      — what BlockCirculantLinear runs in eval mode: at M <= COLS_MAX_M (16) in fp16 / bf16,
              reparam_kernels.ops.block_circulant_cols_linear (the tensor-core kernel on the blocks'
              first columns, `backend` "cuda_cols"; the FFT kernel is then the peer "cuda_fft", and the
              same kernel without split K "cuda_cols_1split", split wherever it may "cuda_cols_split",
              above M = 8 in 8-row tiles "cuda_cols_8rows", in one wide CTA a tile wherever the wide
              CTAs fit at once "cuda_cols_wide"),
              else reparam_kernels.ops.block_circulant_linear (the fused FFT kernel for
              b = 64..4096 powers of two; the row's `backend` says what ran);
              Toeplitz rows the same way (toeplitz_linear, or the columns op on its embedding's column);
              above that threshold, up to M = 256, the columns op is the peer "cuda_cols";
* cublas    — F.linear on the dense weight of the same shape (the block-circulant
              matrix expanded, in the activation dtype);
* peers     — "torch_fft": rfft · einsum block products · irfft (the reference,
              fp32), and "triton": torch.fft transforms + the Triton block-product kernel;
              the CUDA kernel the op does not take at this M: "cuda_large_m" (spectrum sums
              in registers, forced below REPARAM_BC_LARGE_M_MIN_M, from M = 16) or
              "cuda_fft_per_block" (the general kernel, forced at or above it).

A plain circulant n×n is the case N = K = b. Toeplitz n×n runs through its
circulant embedding of size L = 2n (the CUDA kernel takes L <= 4096; larger L
run the Triton path, recorded in `backend`). Rows carry `bytes` (x, spectrum,
y: what the op must move) and an approximate `flops` (FFTs at 2.5·n·log2 n
real flops each, plus 8 flops per complex multiply-add of the block products).
"""
import math

import torch
import torch.nn.functional as F

from common import (Contender, Results, bench_arg_parser, check_rows, measure_ceilings, progress, require_cuda,
                    rotation_count, run_case, shapes_and_batches, with_env, DTYPES)
from reparam_kernels.cli.env import cuda_paths

import reparam_kernels
from reparam_kernels import _dispatch, reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress import structured as st
from reparam_kernels.nn.structured import COLS_MAX_M, TOEPLITZ_COLS_MAX_M
from reparam_kernels.ops.block_circulant_cols_linear import CUDA_BLOCK_SIZES as COLS_BLOCK_SIZES

BLOCKS = (256, 512, 1024, 4096)
QUICK_BLOCKS = (256, 4096)
QUICK_STRUCTURED_SHAPES = [(4096, 4096), (14336, 4096)]  # the shapes the targets name
# issue 4's targets as (N, K, b, M), measured first in --quick (a cut-short run still has them):
# block-circulant 4096² b = 256 at M = 1, 16, 2048; circulant n = 4096 at M = 1; 14336x4096 b = 512 at M = 1, 16
QUICK_TARGETS = [(4096, 4096, 256, 1), (4096, 4096, 256, 16), (4096, 4096, 256, 2048), (4096, 4096, 4096, 1),
                 (14336, 4096, 512, 1), (14336, 4096, 512, 16)]
TOEPLITZ_SIZES = (256, 1024, 4096)
COLS_PEER_MAX_M = 256  # the columns kernel timed as a peer up to here (above REPARAM_BC_COLS_MAX_M), to set that threshold
MAX_SETS = 512  # spectra are tiny: cap the rotation (they are what a real model streams anyway)


def _flops(M, N, K, b):
    p, q = math.ceil(N / b), math.ceil(K / b)
    fft = 2.5 * b * math.log2(b)
    return int(M * (q + p) * fft + 8 * M * p * q * (b // 2 + 1))


def make_sets(N, K, b, M, dtype, count, dense_count, device):
    """(x, spectrum) sets for the structured contenders, (x, W dense) for cuBLAS and (x, fp32 block
    columns) for the columns op; set 0 of each is the same product."""
    p, q = math.ceil(N / b), math.ceil(K / b)
    ours, dense = [], []
    for _ in range(count):
        cols = torch.randn(p, q, b, device=device, dtype=torch.float64) / math.sqrt(K)
        x = torch.randn(M, K, device=device).to(dtype)
        ours.append((x, st.block_circulant_spectrum(cols, torch.float32), cols))
    for i in range(dense_count):
        x, _, cols = ours[i % count]
        dense.append((x, st.block_circulant_to_dense(cols.float(), N, K).to(dtype)))
    return [(x, s) for x, s, _ in ours], dense, [(x, c.float()) for x, _, c in ours]


def bench_block(res, N, K, b, M, dtype, modes, device="cuda", count=None, op="block_circulant_linear"):
    """Check, then time, one case; `device`/`count` exist so the CPU tests can run it small."""
    elt = torch.empty((), dtype=dtype).element_size()
    p, q = math.ceil(N / b), math.ceil(K / b)
    spec_bytes = p * q * 2 * (b // 2 + 1) * 4
    must_move = M * K * elt + spec_bytes + M * N * elt
    sets, dense, col_sets = make_sets(N, K, b, M, dtype, count or min(MAX_SETS, rotation_count(must_move)),
                            count or rotation_count(N * K * elt + (M * K + M * N) * elt), device)
    x0, s0 = sets[0]
    if op == "block_circulant_linear":
        ours_fn = lambda x, s: reparam_kernels.ops.block_circulant_linear(x, s, b, N)  # noqa: E731
        cols_fn = lambda x, c: reparam_kernels.ops.block_circulant_cols_linear(x, c, N)  # noqa: E731
        ref = lambda: reference.block_circulant_linear(check_rows(x0).double(), s0.double(), b, N)  # noqa: E731
        size = b
    else:  # Toeplitz n×n as its L×L embedding: the spectrum sets are already embeddings of size b = L
        ours_fn = lambda x, s: reparam_kernels.ops.toeplitz_linear(x, s, b, N)  # noqa: E731
        cols_fn = lambda x, c: reparam_kernels.ops.block_circulant_cols_linear(x, c, N)  # noqa: E731
        ref = lambda: reference.toeplitz_linear(check_rows(x0).double(), s0.double(), b, N)  # noqa: E731
        size = b
    peers = {"torch_fft": Contender(lambda x, s: reference.block_circulant_linear(x, s, size, N), sets)}
    if rk_triton.block_circulant_linear is not None and device == "cuda":
        peers["triton"] = Contender(lambda x, s: rk_triton.block_circulant_linear(x, s, size, N), sets)
    backend, why = _dispatch.backend_for(op, "cuda", dtype)
    if size not in (1 << e for e in range(6, 13)):
        backend = "triton" if rk_triton.block_circulant_linear is not None else "reference"
    if backend == "cuda" and device == "cuda":
        # the other CUDA kernel at this M (csrc/block_circulant_large_m.cuh vs block_circulant_linear.cu):
        # the measured crossover sets REPARAM_BC_LARGE_M_MIN_M
        if M >= (cuda_paths()["bc_large_m"]["min_m"] or float("inf")):
            peers["cuda_fft_per_block"] = Contender(with_env(ours_fn, "REPARAM_BC_LARGE_M_MIN_M", "0"), sets)
        elif M >= 16:
            peers["cuda_large_m"] = Contender(with_env(ours_fn, "REPARAM_BC_LARGE_M_MIN_M", "1"), sets)
    ours = Contender(ours_fn, sets)
    if device == "cuda" and takes_cols(M, b, dtype, op == "toeplitz_linear"):  # (Toeplitz: its embedding's column)
        # (the FFT path it replaces: the CUDA kernel, or Triton where the size is past the kernel's 4096)
        ours, peers["cuda_fft" if backend == "cuda" else f"{backend}_fft"], backend = (
            Contender(cols_fn, col_sets), ours, "cuda_cols")
        # K never split across CTAs (each warp's chunks one after another, no fixup), and split wherever it
        # leaves no more than 32 partials (the plan before session 42): the default splits only where the
        # output tiles alone leave SMs idle (run 3: unsplit faster on 14336 x 4096, split on 4096^2)
        peers["cuda_cols_1split"] = Contender(with_env(cols_fn, "REPARAM_BC_COLS_SPLITS", "1"), col_sets)
        peers["cuda_cols_split"] = Contender(with_env(cols_fn, "REPARAM_BC_COLS_SPLITS", "32"), col_sets)
        if M > 8 and not cuda_paths()["bc_cols"]["tile_rows_vetoed"]:  # 8-row CTA tiles against the default 16
            peers["cuda_cols_8rows"] = Contender(with_env(cols_fn, "REPARAM_BC_COLS_TILE_ROWS", "8"), col_sets)
        # one wide CTA a tile, K split among its warps, no fixup (REPARAM_BC_COLS_WIDE=1, off until timed) where
        # it applies: against the split over CTAs it would replace
        bc = cuda_paths()["bc_cols"]
        if (not bc["wide"] and not bc["wide_vetoed"]
                and wide_cta_applies(M, N, K, b, torch.cuda.get_device_properties(0).multi_processor_count)):
            peers["cuda_cols_wide"] = Contender(with_env(cols_fn, "REPARAM_BC_COLS_WIDE", "1"), col_sets)
    elif device == "cuda" and M <= COLS_PEER_MAX_M and cols_kernel_runs(b, dtype):
        peers["cuda_cols"] = Contender(cols_fn, col_sets)  # past the layer's threshold: where it should be
    rows = run_case(res, dtype=dtype, M=M, N=N, K=K, params={"block": b} if op == "block_circulant_linear" else {"fft_size": b},
                    modes=modes, ours=ours, cublas=Contender(F.linear, dense), peers=peers,
                    reference=ref, bytes=must_move, flops=_flops(M, N, K, b), backend=backend)
    del sets, dense
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def cols_kernel_runs(b, dtype):
    """Whether block_circulant_cols_linear runs its CUDA kernel for blocks of b and x of dtype."""
    return b in COLS_BLOCK_SIZES and _dispatch.backend_for("block_circulant_cols_linear", "cuda", dtype)[0] == "cuda"


def wide_cta_applies(M, N, K, b, sms, tile_rows=None):
    """Whether block_circulant_cols_linear with REPARAM_BC_COLS_WIDE=1 takes a wide CTA for this case on a GPU of
    `sms` SMs (csrc/block_circulant_cols_linear.cu launch()): tiles of 64 outputs by 8 rows (16 above M = 8 unless
    REPARAM_BC_COLS_TILE_ROWS=8), more than 4 chunks of min(b, 256) inputs along K, and every wide CTA resident at
    once — one row group: 16 warps one an SM or 8 warps two an SM (<= 116 registers); two: 8 warps one an SM (183
    registers; ptxas sm_90a, what the occupancy query answers on an H100 / H200)."""
    tile_rows = tile_rows or cuda_paths()["bc_cols"]["tile_rows"]
    rows = 8 if M <= 8 or tile_rows == 8 else 16
    tiles = -(-N // 64) * -(-M // rows)
    return tiles <= (2 if rows == 8 else 1) * sms and -(-K // min(b, 256)) > 4


def takes_cols(M, b, dtype, toeplitz=False):
    """Whether BlockCirculantLinear / ToeplitzLinear (eval mode) run this case through block_circulant_cols_linear's
    kernel."""
    return (M <= (TOEPLITZ_COLS_MAX_M if toeplitz else COLS_MAX_M) and dtype in (torch.float16, torch.bfloat16)
            and cols_kernel_runs(b, dtype))


def toeplitz_sets_shape(n):
    """Toeplitz n×n: in_features = out_features = n, embedding size L."""
    return n, n, st.toeplitz_fft_size(n, n)


def case_list(shapes, blocks, batches, dtypes, targets_first=False):
    """(N, K, b, M, dtype) in the order they run: every dtype's shapes x blocks x batches (the first
    dtype first), after issue 4's target cases when targets_first."""
    cases = [(N, K, b, M, d) for d in dtypes for (N, K) in shapes for b in blocks for M in batches
             if b <= max(N, K)]
    if not targets_first:
        return cases
    first = [(N, K, b, M, d) for d in dtypes for (N, K, b, M) in QUICK_TARGETS]
    return first + [c for c in cases if c not in first]


def main(argv=None):
    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", default=None, help="comma-separated block sizes (default 256,512,1024,4096)")
    p.add_argument("--no-toeplitz", action="store_true", help="skip the toeplitz_linear cases")
    args = p.parse_args(argv)
    require_cuda(__file__)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else (QUICK_BLOCKS if args.quick else BLOCKS)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    modes = tuple(args.modes.split(","))
    shapes, batches = shapes_and_batches(args.quick)
    if args.quick:
        shapes = QUICK_STRUCTURED_SHAPES
    failures = 0
    res = Results("block_circulant_linear", root=args.out)
    res.ceilings = measure_ceilings()
    cases = case_list(shapes, blocks, batches, dtypes, targets_first=args.quick and not args.blocks)
    for N, K, b, M, dtype in progress(cases, "block_circulant_linear"):
        for row in bench_block(res, N, K, b, M, dtype, modes):
            _print(row, b)
    failures += len(res.failures)
    _report(res)
    if not args.no_toeplitz:
        tres = Results("toeplitz_linear", root=args.out)
        tres.ceilings = res.ceilings
        sizes = TOEPLITZ_SIZES[1:] if args.quick else TOEPLITZ_SIZES
        tcases = [(n, M, d) for n in sizes for d in dtypes for M in batches]
        for n, M, dtype in progress(tcases, "toeplitz_linear"):
            N, K, L = toeplitz_sets_shape(n)
            for row in bench_block(tres, N, K, L, M, dtype, modes, op="toeplitz_linear"):
                _print(row, L)
        failures += len(tres.failures)
        _report(tres)
    return 1 if failures else 0


def _print(row, b):
    peers = "  ".join(f"{k} {v:8.2f} us" for k, v in row["peers"].items())
    print(f"{row['mode']:5} {row['dtype']} M={row['M']:5} N={row['N']:5} K={row['K']:5} b={b:4} [{row['backend']}] "
          f"ours {row['ours_us']:8.2f} us  cuBLAS {row['cublas_us']:8.2f} us  ratio {row['ratio']:6.2f}x  {peers}",
          flush=True)


def _report(res):
    for fail in res.failures:
        print(f"NOT TIMED {fail['case']}: {fail['reason']}")
    print(res.write())


if __name__ == "__main__":
    raise SystemExit(main())
