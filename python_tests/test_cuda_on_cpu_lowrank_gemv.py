"""Low rank at decode as two GEMVs in one cooperative launch (REPARAM_LOWRANK_GEMV=1, csrc/lowrank_gemv.cuh; off
until timed), plain and pivoted factors, run on the CPU through the real sources (python_tests/cuda_on_cpu, as
test_cuda_on_cpu.py): results against float64 at odd shapes (K off the 256-element load row, r and N small, every
M up to 8, u staged in shared memory, read from L2, and both in one CTA; pivoted: several splits a CTA gathers in
turn), where the path applies and where not, then mutations that must be caught."""
import shutil

import pytest
import torch

from test_cuda_on_cpu import check, lowrank_cases, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

GEMV = {"REPARAM_LOWRANK_GEMV": "1", "REPARAM_LOWRANK_CUBLAS_MIN_M": ""}
KERNEL = "lowrank_gemv::Args"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_path_matches_float64(rng, dtype):
    # (M, K, N, r): K = 1000 and 2056 end inside a load row, K = 8 is one load of one lane, r = 8 one chunk of
    # u's row; N = 33 leaves CTAs without rows; every M from 1 to 8 (batches of 8 and of 4 loads)
    # (pivoted: K - r = 8 at (4, 16, 40, 8); (8, 2072, 40, 24) gathers 2 x 1024 columns of 8 rows, two splits by size)
    shapes = [(1, 136, 200, 24), (2, 1000, 72, 64), (3, 2056, 33, 8), (4, 16, 40, 8), (5, 512, 300, 40),
              (6, 264, 17, 16), (7, 768, 64, 128), (8, 1024, 130, 32), (8, 2072, 40, 24)]
    cases, refs = lowrank_cases(rng, shapes, dtype)
    for sms in ("1", "3"):  # one CTA doing every unit and row, and a grid with a K split of several loads
        check(cases, refs, env={**GEMV, "RK_CPU_SMS": sms}, kernel=KERNEL)


def test_gemv_reads_u_from_l2_past_the_staged_rows(rng):
    # REPARAM_LOWRANK_GEMV_STAGE_ROWS caps the rows a CTA copies to shared memory: 0 (every row from L2 after
    # the prefetch) and 3 (both kinds in one CTA); the prefetch reads each address it passes (one past u faults)
    cases, refs = lowrank_cases(rng, [(1, 136, 200, 24), (4, 520, 71, 48)], torch.float16)
    for rows in ("0", "3"):
        check(cases, refs, env={**GEMV, "RK_CPU_SMS": "2", "REPARAM_LOWRANK_GEMV_STAGE_ROWS": rows}, kernel=KERNEL)


def test_gemv_path_is_taken_only_where_it_applies(rng):
    # off by default (two cuBLAS products), M = 9 too many rows, K = 100 not a multiple of 8 (pivoted: K - r = 76),
    # pivoted K - r = 0: the other paths, with the same results
    cases, refs = lowrank_cases(rng, [(2, 136, 50, 24), (9, 136, 50, 24), (2, 100, 50, 24), (2, 24, 40, 24)],
                                torch.float16)
    for env, want in (({"REPARAM_LOWRANK_CUBLAS_MIN_M": ""}, [False] * 8),
                      (GEMV, [True, True, False, False, False, False, True, False])):
        traces = check(cases, refs, env=env)
        assert [any(KERNEL in line for line in t) for t in traces] == want, env


MUTATIONS = {
    # phase 2 before every split sum is written
    "no grid barrier": ("lowrank_gemv.cuh", "  cooperative_groups::this_grid().sync();", "  // (no barrier)"),
    # the split sums' slots overlapping
    "split slot": ("lowrank_gemv.cuh", "a.tp[(int64_t(s) * M + m) * a.r + j] = t;", "a.tp[(int64_t(s) + m) * a.r + j] = t;"),
    # u's copies read before they land
    "no copy wait": ("lowrank_gemv.cuh", "  cp_async_wait<0>();\n  __syncthreads();  // t and", "  __syncthreads();  // t and"),
    # the last split's loads not stopped at its end (past v's last row)
    "split end": ("lowrank_gemv.cuh", "w[i] = k < ke ?", "w[i] = k < ke + kWarpK ?"),
    # x's loads not clamped to the split (the last split's batch reads past x's last row)
    "x clamp": ("lowrank_gemv.cuh", "min(k0 + int64_t(i) * kWarpK, ke - kLaneK)", "k0 + int64_t(i) * kWarpK"),
    # pivoted: the split's columns gathered from the pivots' part of perm
    "gather offset": ("lowrank_gemv.cuh", "a.perm[a.r + kb + c]", "a.perm[kb + c]"),
    # pivoted: t without its identity block
    "identity block": ("lowrank_gemv.cuh", "float t = kPivoted ? ts[e] : 0.0f;", "float t = 0.0f;"),
    # pivoted: a split's columns read before every thread has gathered its share (the barrier before the gather,
    # against overwriting the previous split's columns early, the harness cannot catch: its warps all read a
    # split's columns before any finishes its shuffles)
    "gather barrier": ("lowrank_gemv.cuh", "        __syncthreads();\n        cur_s = s;", "        cur_s = s;"),
    # a staged row read at the wrong place
    "staged row": ("lowrank_gemv.cuh", "const T* row = i < a.staged ? us + i * a.r", "const T* row = i < a.staged ? us + (i ^ 1) * a.r"),
}


PIVOTED_ONLY = ("gather offset", "identity block", "gather barrier")


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_gemv_mutations_are_caught(rng, name):
    # r = 8: the K splits of a grid of 2 x 2 CTAs (the planned 32 warps; plain 1280 + 776, pivoted 1024 + 1024
    # columns); with one CTA (8 warps, 16 units) it runs both splits, the pivoted one gathering twice
    cases, refs = lowrank_cases(rng, [(3, 2056, 33, 8)], torch.float16)
    c, ref = (cases[1], refs[1]) if name in PIVOTED_ONLY else (cases[0], refs[0])
    env = {**GEMV, "RK_CPU_SMS": "1" if name in PIVOTED_ONLY else "2"}
    assert within(run_twice(c, env), ref)
    assert not within(run_twice(c, env, MUTATIONS[name]), ref), name
