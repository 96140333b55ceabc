"""The wgmma paths on the GPU (Hopper, 64 < M < 512): int4_linear, int8_linear and lut_linear
(csrc/quant_wgmma.cuh) and both low-rank ops (csrc/lowrank_wgmma.cuh), against float64 and against
the path they replace (REPARAM_WGMMA=0) at odd sizes, with one and two warpgroups per CTA,
bit-identical repeats, a CUDA graph, and the cases that take another path. (The same sources run
on the CPU through a model of CUDA in test_cuda_on_cpu.py.)"""
import pytest
import torch

import test_lowrank_op as plain
import test_pivoted_lowrank as piv
from test_quant_small_m_gpu import exact, make, run
from conftest import HAS_GPU, TOL, env_var, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_GPU or torch.cuda.get_device_capability()[0] != 9,
                                 reason="wgmma runs on sm_90 only")]

OPS = ["int4_linear", "int8_linear", "lut_linear"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [65, 200, 511])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, 128), (1056, 1000, 32), (8192, 264, 64)])
def test_wgmma_matches_float64_and_wmma_tiles(rng, op, dtype, M, K, N, group, monkeypatch):
    monkeypatch.setenv("REPARAM_DEQUANT_MIN_M", "512")  # wgmma's whole range (by default M >= 129 dequantizes)
    args, w = make(rng, op, M, K, N, dtype, group)
    y = run(op, args)
    ref = exact(args, w)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[dtype]
    with env_var("REPARAM_WGMMA", "0"):
        assert rel_err(run(op, args), ref) <= TOL[dtype]
    with env_var("REPARAM_WGMMA_BN", "64"):
        assert rel_err(run(op, args), ref) <= TOL[dtype]
    assert torch.equal(run(op, args), y)  # no atomics: deterministic


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("M", [1, 16, 33, 64])
def test_wgmma_at_decode_sizes_when_asked(rng, op, M):
    # REPARAM_WGMMA_MIN_M=1: the 64-row batch tiles (bench_quant times them against the small-M path)
    args, w = make(rng, op, M, 4096, 1000, torch.float16, 128)
    with env_var("REPARAM_WGMMA_MIN_M", "1"):
        assert rel_err(run(op, args), exact(args, w)) <= TOL[torch.float16]


@pytest.mark.parametrize("op", OPS)
def test_wgmma_in_a_cuda_graph(rng, op):
    args, w = make(rng, op, 120, 2048, 520, torch.float16)  # (M >= 129 dequantizes by default)
    run(op, args)  # warm up outside the capture (opt-in of the shared memory size)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run(op, args)
    for _ in range(3):
        args[0].copy_(torch.randn(args[0].shape, generator=rng).half())
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, exact(args, w)) <= TOL[torch.float16]


def test_wgmma_falls_back_on_misaligned_x(rng):
    args, w = make(rng, "int8_linear", 100, 1024, 72, torch.float16)
    buf = torch.empty(args[0].numel() + 1, device="cuda", dtype=torch.float16)
    args[0] = buf[1:].view_as(args[0]).copy_(args[0])  # 2 bytes off 16-byte alignment
    assert rel_err(run("int8_linear", args), exact(args, w)) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [65, 200, 511])
@pytest.mark.parametrize("K,N,r", [(8192, 8192, 512), (1000, 520, 72), (576, 1536, 320), (48, 40, 40)])
def test_lowrank_wgmma_matches_float64_and_wmma_kernel(rng, dtype, M, K, N, r, monkeypatch):
    monkeypatch.setenv("REPARAM_LOWRANK_CUBLAS_MIN_M", "0")  # by default these M take two cuBLAS products
    x, u, v, b = plain.make(rng, (M,), K, N, r, dtype, device="cuda")
    ref = plain.exact(x, u, v, b)
    y = torch.ops.reparam.lowrank_linear(x, u, v, b)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[dtype]
    with env_var("REPARAM_WGMMA", "0"):
        assert rel_err(torch.ops.reparam.lowrank_linear(x, u, v, b), ref) <= TOL[dtype]
    assert torch.equal(torch.ops.reparam.lowrank_linear(x, u, v, b), y)
    x, u, w, perm, b = piv.make(rng, (M,), K, N, r, dtype, device="cuda")
    y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b)
    assert torch.isfinite(y).all() and rel_err(y, piv.exact(x, u, w, perm, b)) <= TOL[dtype]
