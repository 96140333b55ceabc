"""The small-M tensor-core path of int4_linear, int8_linear, lut_linear and vq_linear (pairs: csrc/small_m_gemm.cuh, M <= 64)
on the GPU: against float64 and against the general path (REPARAM_SMALL_M=0) at odd sizes,
split-K fixups with different split counts back to back (the self-resetting counters),
bit-identical repeats, x prefetched a stage ahead, stream-K and int4's scales after the mma (off by default), a CUDA graph captured
before any eager call on its stream, non-integer
zero points, and the cases that take the general path instead: misaligned x, an int4 group that
is not a power of two, an int8 K that is not a multiple of 16."""
import pytest
import torch

import test_quant_ops as quant_ops
from reparam_kernels.reference.int4_linear import dequantize_int4
from conftest import TOL, env_var, rel_err

exact = quant_ops.exact

pytestmark = pytest.mark.gpu


def make(rng, op, M, K, N, dtype, group=128, int_zeros=True):
    """(args as a list, W64): test_quant_ops.make's case on the GPU (lut: one table per 8 rows where N
    allows; vq: one codebook per 64 rows, GPTVQ's, where N allows — the small-M path's shared-memory
    tables serve 64 or >= 128 rows a codebook); int_zeros=False replaces int4's zero points by non-integer ones."""
    per = 64 if op == "vq_linear" else 8
    args, w = quant_ops.make(op, rng, (M,), K, N, dtype, device="cuda", group=group,
                             tables=N // per if N % per == 0 else 1)
    args = list(args)
    if not int_zeros:
        args[3] = (torch.rand(args[3].shape, generator=rng) * 15).to(device="cuda", dtype=dtype)
        w = dequantize_int4(*args[1:5], torch.float64)
    return args, w


def run(op, args):
    return getattr(torch.ops.reparam, op)(*args)


def general_path(op, args):
    with env_var("REPARAM_SMALL_M", "0"):
        return run(op, args)


@pytest.mark.parametrize("op", quant_ops.OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, 128), (1056, 1000, 32), (544, 72, 32), (8192, 264, 64)])
def test_small_m_matches_float64_and_general_path(rng, op, dtype, M, K, N, group):
    args, w = make(rng, op, M, K, N, dtype, group)
    y = run(op, args)
    ref = exact(args, w)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(general_path(op, args), ref) <= TOL[dtype]
    assert torch.equal(run(op, args), y)  # split order is fixed: deterministic


@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("op", ["int4_linear", "int8_linear", "lut_linear"])
@pytest.mark.parametrize("M", [1, 12, 24, 40])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, 128), (1056, 1000, 32), (544, 72, 32)])
def test_ring_matches_float64_and_the_register_loop(rng, mode, op, M, K, N, group):
    # REPARAM_SMALL_M_RING=1: the weights through the shared-memory ring (transposed, M <= 16, 32 and
    # 64 tiles; partial last stages at K = 1056 and 544), twice in a row (bit-identical); 2: x too
    args, w = make(rng, op, M, K, N, torch.float16, group)
    with env_var("REPARAM_SMALL_M_RING", mode):
        y = run(op, args)
        again = run(op, args)
    ref = exact(args, w)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[torch.float16]
    assert torch.equal(again, y)
    assert rel_err(run(op, args), ref) <= TOL[torch.float16]


@pytest.mark.parametrize("op", quant_ops.OPS)
@pytest.mark.parametrize("M", [1, 5, 12, 40])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, 128), (1056, 1000, 32)])
def test_x_prefetch_matches_the_register_loop(rng, op, M, K, N, group):
    # REPARAM_SMALL_M_X_AHEAD=1: the next stage's x prefetched into L1 (a hint: the result is bit-identical
    # to the register loop's without it), the rings off so M > 8 runs the register loop too
    args, w = make(rng, op, M, K, N, torch.float16, group)
    with env_var("REPARAM_SMALL_M_RING", "0"):
        plain = run(op, args)
        with env_var("REPARAM_SMALL_M_X_AHEAD", "1"):
            y = run(op, args)
    assert rel_err(y, exact(args, w)) <= TOL[torch.float16]
    assert torch.equal(y, plain)


@pytest.mark.parametrize("op", quant_ops.OPS)
@pytest.mark.parametrize("M", [1, 5, 12])
@pytest.mark.parametrize("K,N,group", [(1024, 28672, 128), (8192, 1280, 128), (1056, 20480, 32), (1056, 1000, 32)])
def test_stream_k_matches_float64(rng, op, M, K, N, group):
    # REPARAM_SMALL_M_STREAM_K=1: every slot an equal share of the stages where the even split leaves slots
    # idle (224, 10 or 160 column blocks on an H200's 264 slots: 224, 160 and 160 CTAs; a partial last stage at
    # K = 1056; 8 column blocks of 5 stages: the even split's 40 CTAs already take one stage each), twice in a
    # row (bit-identical: the pieces are summed in K order), and x prefetched with it; the rings off so
    # M = 12 runs the register loop too
    args, w = make(rng, op, M, K, N, torch.float16, group)
    ref = exact(args, w)
    with env_var("REPARAM_SMALL_M_RING", "0"), env_var("REPARAM_SMALL_M_STREAM_K", "1"):
        y = run(op, args)
        again = run(op, args)
        with env_var("REPARAM_SMALL_M_X_AHEAD", "1"):
            both = run(op, args)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[torch.float16]
    assert torch.equal(again, y) and torch.equal(both, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 8])
@pytest.mark.parametrize("K,N,group,int_zeros", [(4096, 4096, 128, True), (8192, 1280, 256, False),
                                                 (1152, 28672, 128, False), (8192, 264, 128, True)])
def test_post_scale_matches_float64(rng, dtype, M, K, N, group, int_zeros):
    # REPARAM_SMALL_M_POST_SCALE=1 (int4 at M <= 8, groups of a multiple of 128: the scales applied after the mma
    # in fp32): no weight is rounded to 16 bits, so its error is at most the register loop's (~the output's
    # rounding; the tensor cores' own fp32 sums may add a little), twice in a row bit-identical; stream-K with it
    args, w = make(rng, "int4_linear", M, K, N, dtype, group, int_zeros=int_zeros)
    ref = exact(args, w)
    plain = run("int4_linear", args)
    with env_var("REPARAM_SMALL_M_POST_SCALE", "1"):
        y = run("int4_linear", args)
        again = run("int4_linear", args)
        with env_var("REPARAM_SMALL_M_STREAM_K", "1"):
            streamed = run("int4_linear", args)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= max(rel_err(plain, ref), 1.25 * rel_err(ref.to(dtype), ref))
    assert torch.equal(again, y)
    assert rel_err(streamed, ref) <= max(rel_err(plain, ref), 1.25 * rel_err(ref.to(dtype), ref))


@pytest.mark.parametrize("op", quant_ops.OPS)
def test_split_counts_back_to_back(rng, op):
    # Different column and split counts in a row on one stream: each launch must leave its
    # counters at 0 for the next.
    cases = [make(rng, op, M, K, N, torch.float16) for M, K, N in
             [(1, 8192, 128), (3, 2048, 640), (1, 8192, 128), (16, 4096, 256), (64, 1024, 64), (2, 8192, 96)]]
    for _ in range(3):
        for args, w in cases:
            assert rel_err(run(op, args), exact(args, w)) <= 5e-3


@pytest.mark.parametrize("op", quant_ops.OPS)
def test_graph_captured_before_any_eager_call(rng, op):
    args, w = make(rng, op, 1, 8192, 512, torch.float16)  # 4 column blocks: K is split
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        y = run(op, args)
    for _ in range(3):
        args[0].copy_(torch.randn(args[0].shape, generator=rng).half())
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, exact(args, w)) <= 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_non_integer_zero_points(rng, dtype):
    args, w = make(rng, "int4_linear", 7, 2048, 384, dtype, int_zeros=False)
    assert rel_err(run("int4_linear", args), exact(args, w)) <= TOL[dtype]


@pytest.mark.parametrize("op", ["int4_linear", "int8_linear"])
def test_misaligned_x_takes_the_general_path(rng, op):
    args, w = make(rng, op, 4, 512, 200, torch.float16, group=32)
    buf = torch.empty(4 * 512 + 1, device="cuda", dtype=torch.float16)
    x = buf[1:].view(4, 512)  # contiguous, 2 bytes past a 16-byte boundary
    x.copy_(args[0])
    args[0] = x
    assert rel_err(run(op, args), exact(args, w)) <= 5e-3


def test_int4_group_not_a_power_of_two_takes_the_general_path(rng):
    args, w = make(rng, "int4_linear", 5, 576, 136, torch.float16, group=96)
    assert rel_err(run("int4_linear", args), exact(args, w)) <= 5e-3


def test_int8_odd_k_takes_the_general_path(rng):
    args, w = make(rng, "int8_linear", 3, 200, 72, torch.bfloat16)
    assert rel_err(run("int8_linear", args), exact(args, w)) <= TOL[torch.bfloat16]
