"""The large-M path of int8_linear, int4_linear, lut_linear and vq_linear (csrc/quant_dequant_mm.cuh:
dequantize W once, cuBLAS through aten::mm.out into y, then the bias) on the GPU: against float64
and against the general path (REPARAM_DEQUANT_MIN_M=0) at odd sizes, with and without bias, with
leading dims, and inside a CUDA graph."""
import pytest
import torch

from conftest import TOL, env_var, rel_err
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


@pytest.mark.parametrize("op", OPS)
def test_large_m_in_a_cuda_graph(rng, op):
    args, w = make(op, rng, (600,), 256, 136, torch.float16, device="cuda")
    run(op, args)  # warm-up (cuBLAS handles and workspaces) before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run(op, args)
    args[0].copy_(torch.randn(args[0].shape, generator=rng).half())
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, exact(args, w)) <= 5e-3


@pytest.mark.parametrize("op,K", [("int8_linear", 1004), ("lut_linear", 1000)])
def test_large_m_k_not_a_multiple_of_8(rng, op, K):
    # rows not 16-byte aligned in the dequantized buffer: the pass's scalar stores
    args, w = make(op, rng, (300,), K, 77, torch.bfloat16, device="cuda", group=32, tables=1)
    y = run(op, args)
    assert torch.isfinite(y).all() and rel_err(y, exact(args, w)) <= TOL[torch.bfloat16]
