"""The large-M path of int8_linear, int4_linear, lut_linear and vq_linear (csrc/quant_dequant_mm.cuh:
dequantize W once, cuBLAS through aten::mm.out into y, then the bias) on the GPU: against float64
and against the general path (REPARAM_DEQUANT_MIN_M=0) at odd sizes, with and without bias, with
leading dims, and inside a CUDA graph; the weight a piece of rows at a time within a scratch budget."""
import pytest
import torch

from conftest import TOL, env_var, rel_err
from reparam_kernels.cli.env import dequant_pieces
from test_cuda_paths_gpu import kernels
from test_quant_ops import exact, make

pytestmark = pytest.mark.gpu
OPS = ["int8_linear", "int4_linear", "lut_linear", "vq_linear"]


def run(op, args):
    return getattr(torch.ops.reparam, op)(*args)


def general_path(op, args):
    with env_var("REPARAM_DEQUANT_MIN_M", "0"):
        return run(op, args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,K,N", [((512,), 1024, 1000), ((3, 250), 544, 72), ((2048,), 4096, 4096)])
def test_large_m_matches_float64_and_general_path(rng, op, dtype, lead, K, N):
    args, w = make(op, rng, lead, K, N, dtype, device="cuda", group=32, tables=8 if N % 8 == 0 else 1)
    for nob in (False, True):
        a = (*args[:-1], None) if nob else args
        ref = exact(a, w)
        y = run(op, a)
        assert y.shape == (*lead, N) and torch.isfinite(y).all()
        assert rel_err(y, ref) <= TOL[dtype]
        assert rel_err(general_path(op, a), ref) <= TOL[dtype]


def replayed(rng, op, args):
    """The op captured in a CUDA graph, replayed on a fresh x (in place in args): its output."""
    run(op, args)  # warm-up (cuBLAS handles and workspaces) before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run(op, args)
    args[0].copy_(torch.randn(args[0].shape, generator=rng).half())
    g.replay()
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("op", OPS)
def test_large_m_in_a_cuda_graph(rng, op):
    args, w = make(op, rng, (600,), 256, 136, torch.float16, device="cuda")
    assert rel_err(replayed(rng, op, args), exact(args, w)) <= 5e-3


@pytest.mark.parametrize("op,K", [("int8_linear", 1004), ("lut_linear", 1000)])
def test_large_m_k_not_a_multiple_of_8(rng, op, K):
    # rows not 16-byte aligned in the dequantized buffer: the pass's scalar stores
    args, w = make(op, rng, (300,), K, 77, torch.bfloat16, device="cuda", group=32, tables=1)
    y = run(op, args)
    assert torch.isfinite(y).all() and rel_err(y, exact(args, w)) <= TOL[torch.bfloat16]


# dequantize + cuBLAS a piece of rows at a time (csrc/quant_dequant_mm.cuh dequant_chunk_rows): a 2 MB budget
# against a 12 MB weight (N = 3000 rows of K = 2048, M = 2048: 3 or more pieces on any GPU of <= 200 SMs, as
# `env`'s mirror of the rule says), the last piece shorter, the bias narrowed with y's columns; the scratch
# bounded by the piece, not the weight; the same output as the weight in one piece
@pytest.mark.parametrize("op", ["int4_linear", "int8_linear", "lut_linear", "vq_linear"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_in_pieces_matches_float64(rng, op, dtype):
    M, K, N = 2048, 2048, 3000
    args, w = make(op, rng, (M,), K, N, dtype, device="cuda", group=128, tables=8)
    rows, pieces = dequant_pieces(M, N, K, 2, torch.cuda.get_device_properties(0).multi_processor_count, 2 * 2**20)
    assert pieces >= 3
    with env_var("REPARAM_DEQUANT_SCRATCH_MB", "2"):
        names = kernels(lambda: run(op, args))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = run(op, args)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    assert names.count("dequantize_kernel") == pieces, names
    assert extra <= rows * K * 2 + y.numel() * y.element_size() + 2**20, extra  # scratch + y (+ rounding)
    assert torch.isfinite(y).all() and rel_err(y, exact(args, w)) <= TOL[dtype]
    with env_var("REPARAM_DEQUANT_SCRATCH_MB", "0"):  # the whole weight in one piece
        assert kernels(lambda: run(op, args)).count("dequantize_kernel") == 1
        whole = run(op, args)
    assert rel_err(y, whole) <= TOL[dtype]


@pytest.mark.parametrize("op", ["int4_linear", "int8_linear"])
def test_dequantize_in_pieces_in_a_cuda_graph(rng, op):
    # the pieces' strided views of y and the bias copied into them, captured and replayed
    args, w = make(op, rng, (2048,), 1024, 3000, torch.float16, device="cuda", group=128)
    with env_var("REPARAM_DEQUANT_SCRATCH_MB", "1"):
        y = replayed(rng, op, args)
    assert rel_err(y, exact(args, w)) <= TOL[torch.float16]
