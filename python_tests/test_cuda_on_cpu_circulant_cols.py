"""csrc/block_circulant_cols_linear.cu (the tensor-core decode kernel of block-circulant layers) executed on the
CPU through python_tests/cuda_on_cpu, against float64: every chunk width (b = 64, 128, >= 256), blocks
wider than a chunk (the Toeplitz tiles' offsets inside a block), K and N off the blocks and the tiles, odd K
(x's pairs loaded as two halves), one and two row groups and several row tiles, with and without split K,
and mutations that must be caught."""
import importlib
import math
import os
import shutil
import sys

import pytest
import torch

from test_cuda_on_cpu import check, run_twice, within
from reparam_kernels.compress import structured as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def cols_case(rng, M, K, N, b, dtype, bias=True):
    p, q = math.ceil(N / b), math.ceil(K / b)
    cols = torch.randn(p, q, b, generator=rng, dtype=torch.float64) / math.sqrt(K)
    x = torch.randn(M, K, generator=rng).to(dtype)
    bb = torch.randn(N, generator=rng).to(dtype) if bias else None
    ref = x.double() @ st.block_circulant_to_dense(cols, N, K).t()
    case = {"op": "block_circulant_cols_linear", "args": [x, cols.float(), bb], "ints": [N]}
    return case, ref + bb.double() if bias else ref


SHAPES = [  # M, K, N, b, dtype
    (1, 1000, 700, 64, torch.float16),      # chunks of 64 (C = 4); a CTA's last warps past N
    (3, 1029, 515, 128, torch.bfloat16),    # C = 8; odd K: pairs of x as two 16-bit loads
    (9, 700, 1100, 256, torch.float16),     # two row groups, rows 9..15 past M
    (16, 1100, 300, 512, torch.bfloat16),   # chunks at 0 and 256 inside a 512-block
    (17, 300, 260, 256, torch.float16),     # two row tiles
    (2, 2100, 2050, 1024, torch.float16),   # b = 1024: chunk offsets 0..768, N off the CTA tile
    (1, 4096, 600, 4096, torch.bfloat16),   # one block column, 16 chunks
    (3, 3000, 2900, 8192, torch.float16),   # a Toeplitz layer's embedding: one block wider than the FFT kernel takes
]


@pytest.mark.parametrize("sms", [2, 132])
def test_cols_kernel_matches_float64(rng, sms):
    # 2 SMs: few splits (several chunks per CTA); 132: up to 32 splits, fixed up by the last CTA
    cases, refs = [], []
    for i, (M, K, N, b, dtype) in enumerate(SHAPES):
        c, r = cols_case(rng, M, K, N, b, dtype, bias=i % 2 == 0)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, env={"RK_CPU_SMS": str(sms)}, kernel="ColsArgs")
    splits = [int(line.split("grid (")[1].split(",")[1]) for t in traces for line in t if "grid (" in line]
    assert (min(splits) == 1) if sms == 2 else (max(splits) > 1), splits  # both ways of finishing ran


def test_cols_kernel_without_split_k(rng):
    # REPARAM_BC_COLS_SPLITS=1 (bench_structured's cuda_cols_1split): every warp through its chunks one after
    # another, no fixup, on the GPU that split K most above
    cases, refs = [], []
    for M, K, N, b, dtype in SHAPES[:4]:
        c, r = cols_case(rng, M, K, N, b, dtype)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, env={"RK_CPU_SMS": "132", "REPARAM_BC_COLS_SPLITS": "1"}, kernel="ColsArgs")
    assert all(",1," in line.split("grid (")[1] for t in traces for line in t if "grid (" in line), traces



def test_cols_kernel_splits_k_only_where_tiles_leave_sms_idle(rng):
    # 8 SMs of 4 CTAs: N = 520 (9 tiles of 64 outputs) fills them unsplit, N = 400 (7 tiles) does not; M = 16 at
    # N = 520 (one 16-row tile) too. REPARAM_BC_COLS_SPLITS=32 (bench_structured's cuda_cols_split) splits all three.
    shapes = [(1, 2048, 520, 256, torch.float16), (1, 2048, 400, 256, torch.bfloat16),
              (16, 2048, 520, 512, torch.float16)]
    cases, refs = [], []
    for M, K, N, b, dtype in shapes:
        c, r = cols_case(rng, M, K, N, b, dtype)
        cases.append(c)
        refs.append(r)

    def splits(env):
        traces = check(cases, refs, env=dict(env, RK_CPU_SMS="8", RK_CPU_BLOCKS_PER_SM="4"), kernel="ColsArgs")
        return [int(line.split("grid (")[1].split(",")[1]) for t in traces for line in t if "grid (" in line]

    auto, forced = splits({}), splits({"REPARAM_BC_COLS_SPLITS": "32"})
    assert auto[0] == 1 and auto[1] > 1 and auto[2] == 1, auto
    assert all(n > 1 for n in forced), forced


def test_cols_kernel_in_8_row_tiles(rng):
    # REPARAM_BC_COLS_TILE_ROWS=8 (bench_structured's cuda_cols_8rows): above M = 8 one row group a CTA, so
    # twice the row tiles; rows past M in the last tile, odd K, split and unsplit K
    cases, refs = [], []
    for M, K, N, b, dtype in [(9, 700, 1100, 256, torch.float16), (16, 1100, 300, 512, torch.bfloat16),
                              (17, 301, 260, 256, torch.float16), (12, 4096, 600, 4096, torch.bfloat16)]:
        c, r = cols_case(rng, M, K, N, b, dtype)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, env={"RK_CPU_SMS": "132", "REPARAM_BC_COLS_TILE_ROWS": "8"}, kernel="ColsArgs")
    row_tiles = [int(line.split("grid (")[1].split(",")[2].split(")")[0]) for t in traces for line in t
                 if "grid (" in line]
    assert row_tiles == [2, 2, 3, 2], row_tiles  # ceil(M / 8): 8-row tiles taken


def test_cols_kernel_in_wide_ctas(rng):
    # REPARAM_BC_COLS_WIDE=1 (bench_structured's cuda_cols_wide): one CTA of 16 warps (8 with two row groups, or
    # where 16-warp CTAs would not all be resident) a tile, K split only inside it; a warp past the last chunk adds
    # nothing; K of 4 chunks or fewer (nothing to share) and tiles past what the GPU holds keep the narrow CTA
    shapes = [(1, 4096, 600, 4096, torch.bfloat16),   # 16 chunks: one a warp
              (3, 3000, 700, 256, torch.float16),     # 12 chunks, the last partial: warps 12..15 idle
              (12, 4100, 520, 512, torch.float16),    # two row groups: 8 warps, 17 chunks (3 for warp 0)
              (2, 1000, 700, 64, torch.bfloat16),     # chunks of 64: 16 chunks over 16 warps
              (5, 1024, 300, 256, torch.float16)]     # 4 chunks: narrow
    cases, refs = [], []
    for i, (M, K, N, b, dtype) in enumerate(shapes):
        c, r = cols_case(rng, M, K, N, b, dtype, bias=i % 2 == 1)
        cases.append(c)
        refs.append(r)

    def launches(env):
        # (RK_CPU_SKEW: warps drift apart, as they would past the barrier before the sums overwrite the pairs)
        full = {"RK_CPU_SMS": "132", "REPARAM_BC_COLS_WIDE": "1", "RK_CPU_SKEW": "5000", **env}
        traces = check(cases, refs, env=full, kernel="ColsArgs")
        return [(int(line.split("grid (")[1].split(",")[1]), int(line.split(" block ")[1].split()[0]))
                for t in traces for line in t if "grid (" in line]

    assert launches({}) == [(1, 512), (1, 512), (1, 256), (1, 512), (1, 128)]
    # bench_structured times the peer cuda_cols_wide where its rule says the kernel takes the wide CTA
    wide = importlib.import_module("bench_structured").wide_cta_applies
    assert [wide(M, N, K, b, 132, tile_rows=16) for M, K, N, b, _ in shapes] == [True] * 4 + [False]
    assert not any(wide(M, N, K, b, 2, tile_rows=16) for M, K, N, b, _ in shapes)
    # 4 SMs holding two CTAs of up to 256 threads (as registers would): 16 warps fit 4 tiles, 8 warps 8 tiles
    small = {"RK_CPU_SMS": "4", "RK_CPU_BLOCKS_PER_SM": "2", "RK_CPU_THREADS_PER_SM": "512"}
    cases[:] = []
    refs[:] = []
    for M, K, N, b, dtype in [(1, 2048, 250, 256, torch.float16), (2, 2048, 500, 256, torch.bfloat16),
                              (1, 2048, 520, 256, torch.float16), (12, 2048, 250, 512, torch.float16)]:
        c, r = cols_case(rng, M, K, N, b, dtype)
        cases.append(c)
        refs.append(r)
    assert launches(small) == [(1, 512), (1, 256), (1, 128), (1, 256)]
    # tiles enough for every SM (2 SMs): the narrow CTA, its own plan
    assert all(block == 128 for _, block in launches({"RK_CPU_SMS": "2"}))


COLS_MUTATIONS = {
    # the A fragment's registers in the wrong order: rows g + 8 and columns 2t + 8 swapped
    "fragment order": ("block_circulant_cols_linear.cu", "{u[sd], u[sd + 1], u[sd - 1], u[sd]}",
                       "{u[sd], u[sd - 1], u[sd + 1], u[sd]}"),
    # the high half of a pair read at e + 1 instead of e - 1
    "pair direction": ("block_circulant_cols_linear.cu", "hi[v] = __ldg(c + ((e - 1) & bm));",
                       "hi[v] = __ldg(c + ((e + 1) & bm));"),
    # a lane's registers read from the window without its own offset g - 2t
    "window offset": ("block_circulant_cols_linear.cu", "pw + (g - 2 * t + 6);", "pw + 6;"),
    # rows past M loaded from past the end of x (the fast path's clamp dropped)
    "row clamp": ("block_circulant_cols_linear.cu", "const int64_t row = min(m0 + 8 * r + g, a.M - 1);",
                  "const int64_t row = m0 + 8 * r + g;"),
    # the chunk's offset inside its block ignored (right only for chunks at a block's start)
    "chunk offset": ("block_circulant_cols_linear.cu", "return n_loc - (int(k) & bm) - 16", "return n_loc - 16"),
    # every split's partials written to the first split's slot
    "partial slot": ("block_circulant_cols_linear.cu", "a.part[(int64_t(split) * a.M + row) * a.N + col] = v;",
                     "a.part[row * a.N + col] = v;"),
    # every warp of the CTA through every chunk of the split (each chunk counted four times)
    "chunk stride": ("block_circulant_cols_linear.cu", "ch < c_hi; ch += W)", "ch < c_hi; ch += 1)"),
    # the wide CTA's sums written over the pairs while other warps still read them
    "wide barrier": ("block_circulant_cols_linear.cu", "  if constexpr (kShare) __syncthreads();", ""),
    # the warps' sums read before every warp wrote them
    "missing barrier": ("block_circulant_cols_linear.cu", "  __syncthreads();\n  const int rows", "  const int rows"),
    # the next chunk's x prefetched past K (the last chunk's lines past the end of the last row; a warp with
    # two chunks or more: on 2 SMs)
    "prefetch bound": ("block_circulant_cols_linear.cu", "if (64 * t < 16 * C && kt < a.K) prefetch_l2(",
                       "if (64 * t < 16 * C) prefetch_l2("),
    # an odd K's last pair read as a full word (past the row)
    "odd tail": ("block_circulant_cols_linear.cu", "return k + 1 < a.K ? lo | (small_m::load16(p + 1) << 16) : lo;",
                 "return lo | (small_m::load16(p + 1) << 16);"),
}


@pytest.mark.parametrize("name", list(COLS_MUTATIONS))
def test_mutated_cols_kernel_is_caught(rng, name):
    # b = 512: chunks at offsets 0 and 256 of each block; 17 chunks: 5 splits on 132 SMs; K = 4100: 16 whole
    # chunks of word-aligned pairs (the fast path), the last one not; odd K (every chunk the general path)
    # for the mutation of that path's tail
    # (run_twice: a fault reading outside every tensor counts as caught; the second launch reuses the counters)
    c, r = cols_case(rng, 5, 4099 if name == "odd tail" else 4100, 700, 512, torch.float16)
    env = {"RK_CPU_SMS": "2" if name == "prefetch bound" else "132"}
    if name == "wide barrier":  # (warps drifting apart: in lockstep none reaches the sums before all read the pairs)
        env.update(REPARAM_BC_COLS_WIDE="1", RK_CPU_SKEW="5000")
    results = run_twice(c, env)
    assert within(results, r) and ("grid (11,5,1)" in results[0][1][0] or env["RK_CPU_SMS"] == "2"
                                   or "grid (11,1,1) block 512" in results[0][1][0]), results
    assert not within(run_twice(c, env, COLS_MUTATIONS[name]), r)
