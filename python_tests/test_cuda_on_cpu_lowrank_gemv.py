"""Plain low rank at decode as two GEMVs in one cooperative launch (REPARAM_LOWRANK_GEMV=1, csrc/lowrank_gemv.cuh;
off until timed), run on the CPU through the real sources (python_tests/cuda_on_cpu, as test_cuda_on_cpu.py):
results against float64 at odd shapes (K off the 256-element load row, r and N small, every M up to 8, u
staged in shared memory, read from L2, and both in one CTA), where the path applies and where not, then
mutations that must be caught."""
import shutil

import pytest
import torch

from test_cuda_on_cpu import check, lowrank_cases, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

GEMV = {"REPARAM_LOWRANK_GEMV": "1", "REPARAM_LOWRANK_CUBLAS_MIN_M": ""}
KERNEL = "lowrank_gemv::Args"


def plain_cases(rng, shapes, dtype):
    cases, refs = lowrank_cases(rng, shapes, dtype)
    return cases[0::2], refs[0::2]  # (lowrank_cases makes a pivoted twin of each: not this path's)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_path_matches_float64(rng, dtype):
    # (M, K, N, r): K = 1000 and 2056 end inside a load row, K = 8 is one load of one lane, r = 8 one chunk of
    # u's row; N = 33 leaves CTAs without rows; every M from 1 to 8 (batches of 8 and of 4 loads)
    shapes = [(1, 136, 200, 24), (2, 1000, 72, 64), (3, 2056, 33, 8), (4, 8, 40, 8), (5, 512, 300, 40),
              (6, 264, 17, 16), (7, 768, 64, 128), (8, 1024, 130, 32)]
    cases, refs = plain_cases(rng, shapes, dtype)
    for sms in ("1", "3"):  # one CTA doing every unit and row, and a grid with a K split of several loads
        check(cases, refs, env={**GEMV, "RK_CPU_SMS": sms}, kernel=KERNEL)


def test_gemv_reads_u_from_l2_past_the_staged_rows(rng):
    # REPARAM_LOWRANK_GEMV_STAGE_ROWS caps the rows a CTA copies to shared memory: 0 (every row from L2 after
    # the prefetch) and 3 (both kinds in one CTA); the prefetch reads each address it passes (one past u faults)
    cases, refs = plain_cases(rng, [(1, 136, 200, 24), (4, 520, 71, 48)], torch.float16)
    for rows in ("0", "3"):
        check(cases, refs, env={**GEMV, "RK_CPU_SMS": "2", "REPARAM_LOWRANK_GEMV_STAGE_ROWS": rows}, kernel=KERNEL)


def test_gemv_path_is_taken_only_where_it_applies(rng):
    # off by default (two cuBLAS products), M = 9 too many rows, K = 100 not a multiple of 8, pivoted factors:
    # the other paths, with the same results
    cases, refs = plain_cases(rng, [(2, 136, 50, 24), (9, 136, 50, 24), (2, 100, 50, 24)], torch.float16)
    for env, want in (({"REPARAM_LOWRANK_CUBLAS_MIN_M": ""}, [False] * 3), (GEMV, [True, False, False])):
        traces = check(cases, refs, env=env)
        assert [any(KERNEL in line for line in t) for t in traces] == want, env
    cases, refs = lowrank_cases(rng, [(2, 136, 50, 24)], torch.float16)
    traces = check(cases[1:], refs[1:], env=GEMV)
    assert not any(KERNEL in line for line in traces[0])


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
    # a staged row read at the wrong place
    "staged row": ("lowrank_gemv.cuh", "const T* row = i < a.staged ? us + i * a.r", "const T* row = i < a.staged ? us + (i ^ 1) * a.r"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_gemv_mutations_are_caught(rng, name):
    # r = 8 on a grid of two CTAs (16 warps): two K splits of 1280 and 776 elements
    cases, refs = plain_cases(rng, [(3, 2056, 33, 8)], torch.float16)
    env = {**GEMV, "RK_CPU_SMS": "2"}
    assert within(run_twice(cases[0], env), refs[0])
    assert not within(run_twice(cases[0], env, MUTATIONS[name]), refs[0]), name
