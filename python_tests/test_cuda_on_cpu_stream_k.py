"""The small-M register loop's switches that are off until timed, run on the CPU through the real sources
(python_tests/cuda_on_cpu, as test_cuda_on_cpu.py): x prefetched into L1 a stage ahead (REPARAM_SMALL_M_X_AHEAD,
csrc/small_m_gemm.cuh) and stream-K (REPARAM_SMALL_M_STREAM_K, run_cta in csrc/small_m_launch.cuh): results at
every tile shape, then mutations that must be caught."""
import re
import shutil

import pytest
import torch

from test_cuda_on_cpu import QUANT, check, quant_case, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def test_small_m_x_prefetch(rng):
    # REPARAM_SMALL_M_X_AHEAD=1: the next stage's x prefetched into L1 by the register loop (the model reads
    # each prefetched address, so one past x faults); the result is unchanged at every tile shape (the ring
    # off: M > 8 takes the register loop then), int4 / int8 / lut
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g in [(1, 2080, 72, 32), (5, 1088, 40, 64), (12, 1056, 40, 32), (40, 544, 24, 32)]:
            c, r = quant_case(rng, op, M, K, N, torch.float16, group=g)
            cases.append(c)
            refs.append(r)
    env = {"REPARAM_SMALL_M_X_AHEAD": "1", "REPARAM_SMALL_M_RING": "0"}
    for sms in ("1", "4"):
        check(cases, refs, env={**env, "RK_CPU_SMS": sms}, kernel="small_m::Problem")


def test_x_prefetch_past_the_range_is_caught(rng):
    # the prefetch's guard off by one (x of the stage after the last full one: past x's last row at the
    # end of K); the same mutation with the switch off never runs
    c, r = quant_case(rng, "int4_linear", 1, 2048, 24, torch.float16)
    env = {"REPARAM_SMALL_M_X_AHEAD": "1", "RK_CPU_SMS": "1"}
    assert within(run_twice(c, env), r)
    mutation = ("small_m_gemm.cuh", "if (x_ahead && st + 1 < full) {", "if (x_ahead && st < full) {")
    assert run_twice(c, env, mutation) is None  # faulted on the guard page after x
    assert within(run_twice(c, {"RK_CPU_SMS": "1"}, mutation), r)


STREAM_K_SHAPES = [(1, 2080, 300, 32), (5, 4096, 264, 128), (12, 1056, 200, 32), (40, 544, 100, 32)]


def stream_k_cases(rng, ops=QUANT):
    cases, refs = [], []
    for op in ops:
        for M, K, N, g in STREAM_K_SHAPES:
            c, r = quant_case(rng, op, M, K, N, torch.float16, group=g)
            cases.append(c)
            refs.append(r)
    return cases, refs


@pytest.mark.parametrize("sms", ["3", "4", "7"])
def test_small_m_stream_k(rng, sms):
    # REPARAM_SMALL_M_STREAM_K=1: where the even split leaves slots idle (2-3 column blocks on fake GPUs of
    # 3, 4 and 7 SMs), every slot takes an equal share of the stages, a column block's pieces summed in K
    # order by the last to arrive; every tile (the rings off: M > 8 on the register loop), partial last
    # stages (K = 2080, 1056, 544), int4 / int8 / lut; twice in a row (the counters back at 0), and a
    # 1-D grid unlike the even split's
    cases, refs = stream_k_cases(rng)
    env = {"RK_CPU_SMS": sms, "REPARAM_SMALL_M_RING": "0"}
    even = check(cases, refs, env=env, kernel="small_m::Problem")
    streamed = check(cases + cases, refs + refs, env={**env, "REPARAM_SMALL_M_STREAM_K": "1"}, kernel="small_m::Problem")
    grid = [tuple(int(v) for v in re.search(r"grid \((\d+),(\d+),", t[0]).groups()) for t in even + streamed]
    pairs = list(zip(grid[:len(cases)], grid[len(cases):2 * len(cases)]))
    # stream-K (a 1-D grid of more CTAs) wherever the even split left slots idle, else the even split
    assert all(b == a or (b[1] == 1 and b[0] > a[0] * a[1]) for a, b in pairs), pairs
    assert sum(b != a for a, b in pairs) * 2 >= len(pairs), pairs


STREAM_K_MUTATIONS = {
    # a column block's piece count one short (its last piece never sums, or sums too few partials)
    "pieces": ("small_m_launch.cuh", "pieces = cta_of((c + 1) * S - 1) - first + 1;", "pieces = cta_of((c + 1) * S - 1) - first;"),
    # every piece into partial slot 0
    "piece slot": ("small_m_launch.cuh", "piece = i - first;", "piece = 0;"),
    # a range's later column blocks skipped
    "next column": ("small_m_launch.cuh", "u = P > 0 ? min(u_end, (u / S + 1) * S) : u_end;", "u = u_end;"),
    # the piece's K range starting a stage late
    "piece start": ("small_m_launch.cuh", "kb = int64_t(u - c * S) * kUnitK;", "kb = int64_t(u + 1 - c * S) * kUnitK;"),
}


@pytest.mark.parametrize("name", list(STREAM_K_MUTATIONS))
def test_mutated_stream_k_is_caught(rng, name):
    c, r = quant_case(rng, "int4_linear", 1, 2080, 300, torch.float16)
    env = {"RK_CPU_SMS": "4", "REPARAM_SMALL_M_STREAM_K": "1"}
    assert within(run_twice(c, env), r)
    assert not within(run_twice(c, env, STREAM_K_MUTATIONS[name]), r)
