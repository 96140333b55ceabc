"""Which CUDA kernels each op really launches at a given M, read from the profiler: a path that
silently falls back (a build without its code, a check that never passes) would otherwise only
show as a benchmark that equals its peer. The expected paths are docs/quant.md's,
docs/lowrank_kernel.md's and docs/structured.md's (and `python -m reparam_kernels env`)."""
import pytest
import torch

import test_lowrank_op as plain
import test_pivoted_lowrank as piv
import test_structured_op as structured
from test_quant_small_m_gpu import make, run
from conftest import HAS_GPU, TOL, env_var, rel_err

pytestmark = pytest.mark.gpu

HOPPER = HAS_GPU and torch.cuda.get_device_capability()[0] == 9


def kernels(fn):
    """Names of the CUDA kernels fn() launches (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@pytest.mark.parametrize("op", ["int4_linear", "int8_linear", "lut_linear"])
@pytest.mark.parametrize("M,expected", [(1, "small_m_kernel"), (64, "small_m_ring_kernel"), (100, "wgmma_kernel"),
                                        (200, "dequantize_kernel"), (600, "dequantize_kernel")])
def test_quantized_ops_take_their_path(rng, op, M, expected):
    # (M = 64: x and the weights through the shared-memory ring, the default above M = 8)
    if expected == "wgmma_kernel" and not HOPPER:
        expected = "mma_kernel"  # the WMMA tiles below sm_90
    args, _ = make(rng, op, M, 2048, 512, torch.float16, 128)
    assert expected in kernels(lambda: run(op, args))


@pytest.mark.parametrize("M,expected", [(1, "small_m_kernel"), (64, "small_m_kernel"), (100, "mma_kernel"),
                                        (200, "dequantize_kernel")])
def test_vq_pairs_take_their_path(rng, M, expected):
    # no wgmma path for vq_linear: 64 < M < 129 runs the WMMA tiles of the general path
    args, _ = make(rng, "vq_linear", M, 2048, 512, torch.float16)
    assert expected in kernels(lambda: run("vq_linear", args))


# default: two cuBLAS products at every M (measured; pivoted factors keep M = 1 fused); "0": the fused kernels
# at every M
@pytest.mark.parametrize("M,expected,two_gemm_min_m", [(1, None, ""), (2, None, ""), (256, None, ""),
                                                      (1, "lowrank_small_m_kernel", "2"),
                                                      (16, "lowrank_small_m_kernel", "0"), (256, "wgmma_kernel", "0"),
                                                      (600, None, "512")])
def test_lowrank_takes_its_path(rng, M, expected, two_gemm_min_m):
    if expected == "wgmma_kernel" and not HOPPER:
        expected = "lowrank_kernel"  # the WMMA kernel below sm_90
    x, u, v, b = plain.make(rng, (M,), 2048, 1024, 128, torch.float16, device="cuda")
    with env_var("REPARAM_LOWRANK_CUBLAS_MIN_M", two_gemm_min_m):
        names = kernels(lambda: torch.ops.reparam.lowrank_linear(x, u, v, b))
    if expected is None:  # two cuBLAS GEMMs (their kernel names vary by version): none of ours
        assert names and not any(k in names for k in ("lowrank_kernel", "small_m", "wgmma_kernel"))
    else:
        assert expected in names


# pivoted factors on the two cuBLAS products (r = 128): x's columns gathered while 3 M <= 2 r, else w expanded;
# REPARAM_PIVOTED_GATHER forces either; both against float64
@pytest.mark.parametrize("M,gather,expected", [(2, "", "gather_kernel"), (16, "", "gather_kernel"),
                                               (200, "", "expand_kernel"), (16, "0", "expand_kernel"),
                                               (200, "1", "gather_kernel")])
def test_pivoted_two_gemm_gathers_or_expands(rng, M, gather, expected):
    x, u, w, perm, b = piv.make(rng, (M,), 2048, 1024, 128, torch.float16, device="cuda")
    with env_var("REPARAM_PIVOTED_GATHER", gather):
        names = kernels(lambda: torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b))
        y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b)
    assert expected in names and ("expand_kernel" if expected == "gather_kernel" else "gather_kernel") not in names
    assert rel_err(y, piv.exact(x, u, w, perm, b)) <= TOL[torch.float16]


# REPARAM_LOWRANK_GEMV=1 (csrc/lowrank_gemv.cuh): both forms at M <= 8 as two GEMVs in one launch, u staged in
# shared memory (STAGE_ROWS "": as many rows as fit; "0": every row from L2; "5": both in one CTA); the issue's
# shapes at r = 512, odd ones, a u too large to stage whole (28672 rows, 217 a CTA), and CUDA-graph replay
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stage_rows", ["", "0", "5"])
def test_lowrank_gemv_matches_float64(rng, dtype, stage_rows):
    shapes = [(1, 8192, 8192, 512), (8, 8192, 8192, 512), (3, 1000, 72, 64), (5, 2056, 33, 8), (1, 8192, 28672, 512),
              (2, 4096, 14336, 1024)]
    with env_var("REPARAM_LOWRANK_GEMV", "1"), env_var("REPARAM_LOWRANK_GEMV_STAGE_ROWS", stage_rows):
        for M, K, N, r in shapes:
            x, u, v, b = plain.make(rng, (M,), K, N, r, dtype, device="cuda")
            names = kernels(lambda: torch.ops.reparam.lowrank_linear(x, u, v, b))
            assert "lowrank_gemv_kernel" in names, (M, K, N, r)
            torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)  # poison the cache
            y = torch.ops.reparam.lowrank_linear(x, u, v, b)
            assert rel_err(y, plain.exact(x, u, v, b)) <= TOL[dtype], (M, K, N, r)
            # the pivoted form of the same shape: x's columns gathered a split at a time
            xp, up, w, perm, bp = piv.make(rng, (M,), K, N, r, dtype, device="cuda")
            assert "lowrank_gemv_kernel" in kernels(lambda: torch.ops.reparam.pivoted_lowrank_linear(xp, up, w, perm, bp))
            yp = torch.ops.reparam.pivoted_lowrank_linear(xp, up, w, perm, bp)
            assert rel_err(yp, piv.exact(xp, up, w, perm, bp)) <= TOL[dtype], ("pivoted", M, K, N, r)
        g = torch.cuda.CUDAGraph()
        out = torch.empty_like(y)
        with torch.cuda.graph(g):
            out.copy_(torch.ops.reparam.lowrank_linear(x, u, v, b))
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, plain.exact(x, u, v, b)) <= TOL[dtype]


@pytest.mark.parametrize("M,expected", [(1, "block_circulant_kernel"), (16, "block_circulant_kernel"),
                                        (64, "bc_large_m"), (2048, "bc_large_m")])
def test_block_circulant_takes_its_path(rng, M, expected):
    x, spec, _, bias = structured.make(rng, (M,), 4096, 4096, 256, torch.float16, device="cuda")
    assert expected in kernels(lambda: torch.ops.reparam.block_circulant_linear(x, spec, 256, 4096, bias))


@pytest.mark.parametrize("forced", ["1", "0"])  # the large-M kernel everywhere / never
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_circulant_both_kernels_match_float64(rng, forced, dtype):
    # every block size (the large-M kernel's four register layouts), row tails, N and K off the blocks
    for M, K, N, b in [(11, 4100, 2300, 256), (1030, 1000, 700, 64), (3, 1500, 1500, 128), (300, 700, 1100, 512),
                       (5, 1500, 2100, 1024), (6, 2048, 4000, 2048), (1029, 4000, 4096, 4096)]:
        x, spec, cols, bias = structured.make(rng, (M,), K, N, b, dtype, device="cuda")
        torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)  # poison the cache
        with env_var("REPARAM_BC_LARGE_M_MIN_M", forced):
            y = torch.ops.reparam.block_circulant_linear(x, spec, b, N, bias)
            torch.cuda.synchronize()
        err = rel_err(y, structured.exact(x, cols, N, bias))
        assert torch.isfinite(y).all() and err <= {torch.float32: 1e-4}.get(dtype, TOL[dtype]), (M, K, N, b, err)
