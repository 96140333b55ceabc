"""Fused low-rank linear vs cuBLAS dense F.linear vs two cuBLAS calls (and the same product stored
pivoted, op pivoted_lowrank_linear), in one run. The op takes the register-fed decode path at
M <= 64 (plain factors), wgmma between on Hopper and two cuBLAS products at M >= 512; the WMMA
fused kernel that serves the rest elsewhere is then timed as the peer `cuda_wmma_fused`.

    python benchmarks/bench_lowrank.py [--quick] [--ranks 128,512,1024] [--dtypes fp16,bf16]

Writes benchmarks/results/<gpu>/lowrank_linear.json (DESIGN.md format). Each row
also carries `bytes` (x, U, V read once, y written once: what the op must move)
and `flops`; the copy bandwidth and bf16 GEMM ceilings are measured first in
the same run and stored under `ceilings`, so achieved bandwidth is read
against the copy ceiling of this very run.
"""
import torch
import torch.nn.functional as F

from common import (Contender, Results, bench_arg_parser, check_rows, measure_ceilings, progress, require_cuda,
                    rotation_count, run_case, shapes_and_batches, with_env, DTYPES)

import reparam_kernels
from reparam_kernels import _dispatch
from reparam_kernels.cli.env import RING_WEIGHTS, cuda_paths
from reparam_kernels.nn.pivoted import expand_right_factor

RANKS = (128, 512, 1024)
QUICK_RANKS = (512,)


def two_cublas(x, u, v):
    return (x @ v.t()) @ u.t()


def make_sets(N, K, r, M, dtype, low_count, dense_count, device="cuda"):
    """Copies of (x, u, v) for the factored contenders, of (x, u, w, perm) for the pivoted form of the
    same product (v = [I | w]·P: r columns of v are the identity, so both compute the same W) and of
    (x, W = u @ v) for cuBLAS dense, each as many as its own footprint needs to exceed the L2; set 0 of
    all three is the same product."""
    low, piv, dense = [], [], []
    for _ in range(low_count):
        u = (torch.randn(N, r, device=device) / r ** 0.5).to(dtype)
        w = (torch.randn(r, K - r, device=device) / K ** 0.5).to(dtype)
        perm = torch.randperm(K, device=device)
        v = expand_right_factor(w, perm)
        x = torch.randn(M, K, device=device).to(dtype)
        low.append((x, u, v))
        piv.append((x, u, w, perm))
    for i in range(dense_count):
        x, u, v = low[i % low_count]
        dense.append((x, (u.float() @ v.float()).to(dtype)))
    return low, piv, dense


def _lowrank_op(x, u, v):
    """The raw op without a bias: what the fused-kernel peers time under their switches."""
    return torch.ops.reparam.lowrank_linear(x, u, v, None)


def wmma_fused(M):
    """lowrank_linear through the WMMA fused kernel (csrc/lowrank_linear.cu) where the op takes another
    path at this M (the thresholds the op reads: `env`'s cuda_paths): an A/B peer for both; None where
    the op runs that kernel anyway."""
    paths = cuda_paths()
    off = ("REPARAM_SMALL_M", "0", "REPARAM_WGMMA", "0", "REPARAM_LOWRANK_CUBLAS_MIN_M", "0")  # every other path
    cublas = paths["lowrank_cublas"]["min_m"] is not None and M >= paths["lowrank_cublas"]["min_m"]
    wgmma = (paths["wgmma"]["on"] and M >= paths["wgmma"]["min_m"] and torch.cuda.get_device_capability()[0] == 9)
    return with_env(_lowrank_op, *off) if cublas or wgmma or M <= paths["small_m"]["max_m"] else None


def fused(M):
    """lowrank_linear through its fused kernels (small-M, wgmma, WMMA: REPARAM_LOWRANK_CUBLAS_MIN_M=0) where
    the op takes two cuBLAS products at this M (by default every M, from the H200's measurements): the
    A/B peer that says when a fused kernel wins that M back. None where the op runs them anyway."""
    min_m = cuda_paths()["lowrank_cublas"]["min_m"]
    if min_m is None or M < min_m:
        return None
    return with_env(_lowrank_op, "REPARAM_LOWRANK_CUBLAS_MIN_M", "0")


def cublas_pinned(M):
    """lowrank_linear with the two-cuBLAS route pinned by its variable (REPARAM_LOWRANK_CUBLAS_MIN_M=1) at M = 2..64,
    where the op takes that route by default anyway: a diagnostic, not an alternative. Run 3's eager rows for
    ours at 8192² M = 16 / 64 and 28672 x 8192 M = 16 matched its cuda_fused peer (the fused launch), its graph
    rows two_cublas: if this peer's eager rows match two_cublas while ours do not, the route ours took in eager
    mode is the question; if they match ours, the cost is in the op's entry."""
    min_m = cuda_paths()["lowrank_cublas"]["min_m"]
    if min_m is None or M < max(2, min_m) or M > 64:
        return None
    return with_env(_lowrank_op, "REPARAM_LOWRANK_CUBLAS_MIN_M", "1")


def prefetch_u(M):
    """lowrank_linear with its decode launch prefetching u into L2 (REPARAM_LOWRANK_PREFETCH_U=1; off by
    default since run 3 timed it slower) where the op runs that launch (the small-M path, below the two-cuBLAS
    threshold): the A/B peer of the default. None elsewhere."""
    paths = cuda_paths()
    min_m = paths["lowrank_cublas"]["min_m"]
    if not paths["small_m"]["on"] or M > paths["small_m"]["max_m"] or (min_m is not None and M >= min_m):
        return None
    return with_env(_lowrank_op, "REPARAM_LOWRANK_PREFETCH_U", "1")


def ring(M):
    """lowrank_linear with its decode launch streaming both factors through the small-M loop's
    shared-memory ring (REPARAM_SMALL_M_RING=1; off by default, and an explicit 0 skips it) where the op
    runs that launch: the A/B peer of the ring. None elsewhere."""
    paths = cuda_paths()
    min_m = paths["lowrank_cublas"]["min_m"]
    if not paths["small_m"]["on"] or M > paths["small_m"]["max_m"] or (min_m is not None and M >= min_m):
        return None
    if paths["small_m"]["ring"] in RING_WEIGHTS or paths["small_m"]["ring_vetoed"]:  # (RING_X leaves low rank off)
        return None
    return with_env(_lowrank_op, "REPARAM_SMALL_M_RING", "1")


def _pivoted_op(x, u, w, perm):
    return reparam_kernels.ops.pivoted_lowrank_linear(x, u, w, perm)


def pivoted_gathers(M, r):
    """Whether pivoted_lowrank_linear takes the two cuBLAS products with x's columns gathered at this M
    (csrc/lowrank_large_m.cuh gather_pays, the default rule; the M = 1 fused launch and large M expand)."""
    piv_min = cuda_paths()["lowrank_cublas"]["pivoted_min_m"]
    rule = cuda_paths()["lowrank_cublas"]["pivoted_gather"]
    return piv_min is not None and M >= piv_min and (rule == "always" or rule != "never" and 3 * M <= 2 * r)


def bench_shape(res, N, K, r, M, dtype, modes, device="cuda", count=None):
    """Check, then time, one case; `device`/`count` exist so the CPU tests can run it small."""
    elt = torch.empty((), dtype=dtype).element_size()
    must_move = (M * K + r * (N + K) + M * N) * elt
    io = (M * K + M * N) * elt
    low_count = count or rotation_count(must_move)
    dense_count = count or rotation_count(N * K * elt + io)
    low, piv, dense = make_sets(N, K, r, M, dtype, low_count, dense_count, device)
    x0, u0, v0 = low[0]
    backend, why = _dispatch.backend_for("lowrank_linear", "cuda", dtype)
    peers = {"two_cublas": Contender(two_cublas, low),
             # the same product stored pivoted (r·(N + K − r) weights: r² fewer bytes to move)
             "pivoted": Contender(_pivoted_op, piv)}
    if device == "cuda" and pivoted_gathers(M, r):  # its A/B peer: w expanded to [r, K] instead
        peers["pivoted_expand"] = Contender(with_env(_pivoted_op, "REPARAM_PIVOTED_GATHER", "0"), piv)
    piv_min = cuda_paths()["lowrank_cublas"]["pivoted_min_m"]
    if device == "cuda" and piv_min is not None and M < piv_min:  # the fused launch's A/B peers: two products,
        peers["pivoted_two_gemm"] = Contender(with_env(_pivoted_op, "REPARAM_LOWRANK_CUBLAS_MIN_M", "1"), piv)
        # and u prefetched into L2 under phase 1 (the default until run 3 timed it on plain factors)
        peers["pivoted_prefetch_u"] = Contender(with_env(_pivoted_op, "REPARAM_LOWRANK_PREFETCH_U", "1"), piv)
    wmma = wmma_fused(M) if device == "cuda" else None
    if wmma is not None:
        peers["cuda_wmma_fused"] = Contender(wmma, low)
    fused_path = fused(M) if device == "cuda" else None
    if fused_path is not None:
        peers["cuda_fused"] = Contender(fused_path, low)
    pinned = cublas_pinned(M) if device == "cuda" else None
    if pinned is not None:
        peers["cuda_cublas_pinned"] = Contender(pinned, low)
    pf = prefetch_u(M) if device == "cuda" else None
    if pf is not None:
        peers["cuda_prefetch_u"] = Contender(pf, low)
    # Both forms as two GEMVs in one cooperative launch (REPARAM_LOWRANK_GEMV=1, csrc/lowrank_gemv.cuh; off until
    # timed) where it applies: A/B peers against the routes it would replace; unstaged: u read from L2 after a
    # prefetch instead of copied to shared memory. (Switched on by the variable, it is "ours"; vetoed, skipped.)
    lr = cuda_paths()["lowrank_cublas"]
    if device == "cuda" and M <= lr["gemv_max_m"] and not lr["gemv"] and not lr["gemv_vetoed"]:
        on = ("REPARAM_LOWRANK_GEMV", "1")
        peers["cuda_gemv"] = Contender(with_env(_lowrank_op, *on), low)
        unstaged = with_env(_lowrank_op, *on, "REPARAM_LOWRANK_GEMV_STAGE_ROWS", "0")
        peers["cuda_gemv_unstaged"] = Contender(unstaged, low)
        peers["pivoted_gemv"] = Contender(with_env(_pivoted_op, *on), piv)
    with_ring = ring(M) if device == "cuda" else None
    if with_ring is not None:
        peers["cuda_ring"] = Contender(with_ring, low)
    rows = run_case(
        res, dtype=dtype, M=M, N=N, K=K, params={"rank": r}, modes=modes,
        ours=Contender(lambda x, u, v: reparam_kernels.ops.lowrank_linear(x, u, v), low),
        cublas=Contender(F.linear, dense), peers=peers,
        reference=lambda: (check_rows(x0).double() @ v0.double().t()) @ u0.double().t(),
        bytes=must_move, flops=2 * M * r * (N + K), backend=backend,
    )
    del low, piv, dense
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default 128,512,1024; --quick: 512)")
    args = p.parse_args(argv)
    require_cuda(__file__)
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else (QUICK_RANKS if args.quick else RANKS)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    modes = tuple(args.modes.split(","))
    shapes, batches = shapes_and_batches(args.quick)
    res = Results("lowrank_linear", root=args.out)
    res.ceilings = measure_ceilings()
    copy = res.ceilings["copy_tbps"]
    print(f"ceilings: copy {copy:.2f} TB/s, bf16 GEMM {res.ceilings['bf16_gemm_tflops']:.0f} TFLOP/s")
    cases = [(N, K, r, M, d) for d in dtypes for (N, K) in shapes for r in ranks for M in batches]  # fp16 first
    for N, K, r, M, dtype in progress(cases, "lowrank_linear"):
        for row in bench_shape(res, N, K, r, M, dtype, modes):
            tbps = row["bytes"] / (row["ours_us"] * 1e-6) / 1e12
            print(f"{row['mode']:5} {row['dtype']} M={M:5} N={N:5} K={K:5} r={r:4} [{row['backend']}] "
                  f"ours {row['ours_us']:8.2f} us  cuBLAS {row['cublas_us']:8.2f} us  ratio {row['ratio']:5.2f}x  "
                  f"two-cuBLAS {row['peers'].get('two_cublas', float('nan')):8.2f} us  "
                  f"pivoted {row['peers'].get('pivoted', float('nan')):8.2f} us  "
                  f"{tbps:.2f} TB/s = {100 * tbps / copy:.0f}% of copy", flush=True)
    for fail in res.failures:
        print(f"NOT TIMED {fail['case']}: {fail['reason']}")
    print(res.write())
    return 1 if res.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
