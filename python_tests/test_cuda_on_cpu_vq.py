"""vq_linear's CUDA sources (csrc/vq_linear.cu, the format in vq_format.cuh) run on the CPU through python_tests/cuda_on_cpu, as
test_cuda_on_cpu.py does for the other quantized ops: pairs on the small-M path with their codebooks in
shared memory (one copy per lane), every d on the general path (GEMV, WMMA tiles, dequantize + GEMM),
against float64; then mutations of the lookup that must be caught."""
import shutil

import pytest
import torch

from test_cuda_on_cpu import check, run_twice, within
from test_cuda_on_cpu_dequant import PIECES_ENV

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def vq_case(rng, M, K, N, dtype, d=2, entries=256, books=1, bias=True):
    """(case, W64 reference output): random codes < entries, `books` codebooks of N / books rows."""
    x = torch.randn(M, K, generator=rng).to(dtype)
    codes = torch.randint(0, entries, (N, K // d), generator=rng, dtype=torch.uint8)
    cb = (torch.randn(books, entries, d, generator=rng) * 0.1).to(dtype)
    b = torch.randn(N, generator=rng).to(dtype) if bias else None
    w = cb.double()[torch.arange(N)[:, None] // (N // books), codes.long()].reshape(N, K)
    ref = x.double() @ w.T + (b.double() if bias else 0)
    return {"op": "vq_linear", "args": [x, codes, cb, b], "ints": []}, ref


def run(rng, shapes, dtype, kernel, env=None):
    cases, refs = [], []
    for M, K, N, kw in shapes:
        c, r = vq_case(rng, M, K, N, dtype, **kw)
        cases.append(c)
        refs.append(r)
    return check(cases, refs, env=env, kernel=kernel)


# Pairs on the small-M path: all four tile shapes (M = 1, 5: transposed; 16; 17..32; 33..64), a codebook
# per 64 rows (two per 128-row column block), one per >= 128 rows (a block straddling two), one or two a
# layer at any N, fewer than 256 entries (the rest of the copies zero), split K (K = 2080 on 4 fake SMs).
SMALL_M = [(1, 544, 128, {"books": 2}), (5, 1056, 300, {"books": 2}), (16, 512, 264, {"books": 1}),
           (17, 256, 384, {"books": 2, "entries": 100}), (33, 128, 256, {"books": 2}),
           (64, 160, 72, {"books": 2}), (3, 2080, 640, {"books": 10, "bias": False})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vq_pairs_small_m_path(rng, dtype):
    run(rng, SMALL_M, dtype, "small_m::Problem<reparam::VqPairFrag", env={"RK_CPU_SMS": "4"})


def test_vq_general_path_every_d(rng):
    # d = 1..8 (K a multiple of d, not always of 16: partial chunks, bytewise code loads), codebooks per
    # 4 rows (pairs then leave the small-M path too), M on the GEMV (<= 8) and WMMA (> 8) tiles
    shapes = [(M, K, N, {"d": d, "entries": e, "books": N // 4})
              for d, K, e in [(1, 96, 256), (2, 100, 256), (3, 99, 200), (4, 128, 17), (5, 95, 64), (6, 66, 256),
                              (7, 112, 9), (8, 136, 256)]
              for M, N in [(1, 36), (12, 20)]]
    run(rng, shapes, torch.float16, "VqDec", env={"REPARAM_DEQUANT_MIN_M": "0"})


def test_vq_dequantize_then_gemm(rng):
    shapes = [(70, 64, 24, {"d": 2, "books": 3}), (66, 99, 20, {"d": 3, "books": 1})]
    run(rng, shapes, torch.bfloat16, "dequantize_kernel", env={"REPARAM_DEQUANT_MIN_M": "65", "RK_CPU_SMS": "1"})


def test_vq_dequantize_in_pieces(rng):
    # a scratch budget below the weight: pieces of 128 rows (3 for N = 300, a codebook straddling two), each
    # piece's GEMM writing its columns of y (test_cuda_on_cpu.py's test_quant_dequantize_in_pieces)
    shapes = [(70, 64, 300, {"d": 2, "books": 3}), (66, 99, 260, {"d": 3, "books": 2, "bias": False})]
    traces = run(rng, shapes, torch.float16, "dequantize_kernel", env=PIECES_ENV)
    assert [sum("dequantize_kernel" in line for line in t) for t in traces] == [3, 3]


def test_vq_pairs_fall_back_where_the_books_do_not_fit(rng):
    # 3 codebooks of 32 rows: a 128-row column block would read 4 -> the general path, still correct
    traces = run(rng, [(4, 64, 96, {"books": 3})], torch.float16, "gemv_kernel")
    assert not any("VqPairFrag" in line for t in traces for line in t)
    # ... and where REPARAM_VQ_SMALL_M=0 switches the pairs' path off (run_gpu.sh after a failed smoke run)
    run(rng, [(1, 544, 128, {"books": 2}), (17, 256, 384, {"books": 2})], torch.float16, "VqDec",
        env={"REPARAM_VQ_SMALL_M": "0"})


MUTATIONS = {
    # entries 64 bytes apart instead of 128 (32 copies of 4 bytes): another entry's copies
    "entry stride": ("vq_format.cuh", "<< 7));  // byte 2h", "<< 6));  // byte 2h"),
    "second slot": ("vq_format.cuh", "const int64_t slot = n / rows_per_book - col0 / rows_per_book;",
                    "const int64_t slot = 0;"),
    "no barrier": ("small_m_gemm.cuh", "    __syncthreads();  // (every thread: outside the nst test)\n", ""),
    "byte order": ("vq_format.cuh", "0x4441u + 2 * h", "0x4443u - 2 * h"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_vq_pairs_are_caught(rng, name):
    c, r = vq_case(rng, 5, 544, 128, torch.float16, books=2)
    env = {"RK_CPU_SEED": "3"}
    assert within(run_twice(c, env), r)  # unmutated
    assert not within(run_twice(c, env, MUTATIONS[name]), r)
