"""The quantized Triton kernels on the GPU (session 25's rebuild: shape-chosen tiles, split-K, int4's
int32-word GEMV) against float64: every tile class, the automatic split at decode shapes, a forced
uneven split, fp16 / bf16 / fp32, with and without bias, inside a CUDA graph. (The CPU suite runs the
same kernels under TRITON_INTERPRET; this file checks what the GPU compiler made of them.)"""
import pytest
import torch

from reparam_kernels import triton as rk_triton
from conftest import TOL, rel_err
from test_quant_ops import OPS, exact, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(rk_triton.int4_linear is None, reason="triton not installed")]

# (M, K, N, group, split): GEMV with the automatic split (8192 and 4096 deep), 16-row dots, 64-row dots,
# 128 × 128 dots, a forced uneven split, a column count no tile divides. fp16 takes every shape; bf16 and
# fp32 one GEMV and one dot shape (each case compiles its kernel first: the run's test step is short)
SHAPES = [(1, 8192, 4096, 128, None), (1, 4096, 1000, 128, None), (16, 4096, 4096, 128, None),
          (64, 1024, 512, 64, None), (200, 384, 136, 128, None), (1, 640, 70, 64, 4), (5, 512, 77, 32, 3)]
CASES = [(torch.float16, *shape) for shape in SHAPES] + [
    (dtype, *SHAPES[i]) for dtype in (torch.bfloat16, torch.float32) for i in (1, 3)]
_TOL32 = 2e-5  # fp32 runs on the FMA units; the GEMV's sum order differs from float64's


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,M,K,N,group,split", CASES)
def test_triton_gpu_matches_float64(rng, op, dtype, M, K, N, group, split):
    # with a bias (added by the kernel, or by the split's reduction); without one on the forced split
    for bias in (True, False) if split else (True,):
        args, w = make(op, rng, (M,), K, N, dtype, device="cuda", bias=bias, group=group,
                       tables=N if N % 2 else 2)
        y = getattr(rk_triton, op)(*args, split=split)
        torch.cuda.synchronize()
        tol = _TOL32 if dtype == torch.float32 else TOL[dtype]
        assert rel_err(y, exact(args, w)) <= tol, (op, dtype, M, K, N, bias)


@pytest.mark.parametrize("op", OPS)
def test_triton_gpu_graph_capture(rng, op):
    """The split-K launch pair (kernel, reduction) replays from a CUDA graph with fresh inputs."""
    args, w = make(op, rng, (1,), 4096, 512, torch.float16, device="cuda", group=128, tables=2)
    fn = getattr(rk_triton, op)
    fn(*args)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(*args)
    args[0].copy_(torch.randn_like(args[0]))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, exact(args, w)) <= TOL[torch.float16]
