"""The low-rank ops' decode path (csrc/lowrank_small_m.cuh: both products in one cooperative launch
through small_m_gemm.cuh, M <= 64; pivoted factors gather x through perm) on the GPU: against float64 and the WMMA path
(REPARAM_SMALL_M=0) at odd sizes, bit-identical repeats (no atomics), split counts changing from
call to call, a CUDA graph captured before any eager call on its stream."""
import pytest
import torch

import test_lowrank_op as plain
import test_pivoted_lowrank as piv
from conftest import TOL, env_var, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fused_at_every_m(monkeypatch):
    """By default M >= 2 takes two cuBLAS products (lowrank_large_m.cuh): keep the fused path tested."""
    monkeypatch.setenv("REPARAM_LOWRANK_CUBLAS_MIN_M", "0")


def op(x, u, v, b):
    return torch.ops.reparam.lowrank_linear(x, u, v, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 7, 16, 17, 40, 64])
@pytest.mark.parametrize("K,N,r", [(8192, 8192, 512), (1000, 520, 72), (136, 200, 24), (4096, 14336, 256)])
def test_decode_path_matches_float64_and_wmma_path(rng, dtype, M, K, N, r):
    x, u, v, b = plain.make(rng, (M,), K, N, r, dtype, device="cuda")
    ref = plain.exact(x, u, v, b)
    y = op(x, u, v, b)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[dtype]
    with env_var("REPARAM_SMALL_M", "0"):
        assert rel_err(op(x, u, v, b), ref) <= TOL[dtype]
    assert torch.equal(op(x, u, v, b), y)  # fixed summation order: deterministic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("K,N,r", [(8192, 8192, 512), (1000, 520, 72), (576, 1536, 320), (48, 40, 40)])
def test_pivoted_decode_path_matches_float64_and_wmma_path(rng, dtype, M, K, N, r):
    # (48, 40, 40): K - r = 8, the shortest reduction the path takes
    x, u, w, perm, b = piv.make(rng, (M,), K, N, r, dtype, device="cuda")
    ref = piv.exact(x, u, w, perm, b)
    y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[dtype]
    with env_var("REPARAM_SMALL_M", "0"):
        assert rel_err(torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b), ref) <= TOL[dtype]
    assert torch.equal(torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b), y)


@pytest.mark.parametrize("M", [1, 12, 40])
@pytest.mark.parametrize("K,N,r", [(8192, 8192, 512), (1000, 520, 72), (136, 200, 24)])
def test_ring_matches_float64(rng, M, K, N, r):
    # REPARAM_SMALL_M_RING=1: both phases' factors through the shared-memory ring, plain and pivoted
    x, u, v, b = plain.make(rng, (M,), K, N, r, torch.float16, device="cuda")
    xp, up, wp, perm, bp = piv.make(rng, (M,), K, N, r, torch.float16, device="cuda")
    with env_var("REPARAM_SMALL_M_RING", "1"):
        y = op(x, u, v, b)
        yp = torch.ops.reparam.pivoted_lowrank_linear(xp, up, wp, perm, bp)
        assert torch.equal(op(x, u, v, b), y)
    assert torch.isfinite(y).all() and rel_err(y, plain.exact(x, u, v, b)) <= TOL[torch.float16]
    assert torch.isfinite(yp).all() and rel_err(yp, piv.exact(xp, up, wp, perm, bp)) <= TOL[torch.float16]


def test_split_counts_change_between_calls(rng):
    cases = [plain.make(rng, (M,), K, N, r, torch.float16, device="cuda")
             for M, K, N, r in [(1, 8192, 8192, 512), (3, 1024, 64, 8), (1, 64, 9000, 64), (64, 4096, 4096, 128)]]
    for _ in range(3):
        for x, u, v, b in cases:
            assert rel_err(op(x, u, v, b), plain.exact(x, u, v, b)) <= 5e-3


def test_graph_captured_before_any_eager_call(rng):
    x, u, v, b = plain.make(rng, (1,), 4096, 4096, 256, torch.float16, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=torch.cuda.Stream()):
        y = op(x, u, v, b)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=rng).half())
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, plain.exact(x, u, v, b)) <= 5e-3
