"""The small-M loop's shared-memory ring (REPARAM_SMALL_M_RING, csrc/small_m_gemm.cuh kRingStages) run on
the CPU through the real sources (python_tests/cuda_on_cpu, as test_cuda_on_cpu.py): every format and tile
shape, the low-rank decode launch, copies landing at the wait and at once; then mutations that must be
caught (a wait too few, too few slots, the partial stage's copy or read unguarded)."""
import shutil

import pytest
import torch

from test_cuda_on_cpu import QUANT, check, lowrank_cases, quant_case, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def ring_launched(traces):
    # the small-M kernel with the ring's dynamic shared memory (the register-fed one launches with 0)
    return all(any("small_m::Problem" in line and " smem 0" not in line for line in t) for t in traces)


@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("early", ["0", "1"])
def test_small_m_ring(rng, mode, early):
    # REPARAM_SMALL_M_RING=1: the weights through the shared-memory ring, every format and tile shape,
    # partial last stages (K = 2080: 8 stages and a 32-k tail), split K on a 4-SM fake GPU; the copies
    # landing at the wait (the latest the hardware may) and at once (the earliest: a slot overwritten
    # before it is read shows). 2: x too (at M > 8; M <= 8 keeps the weights' ring)
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g in [(1, 2080, 72, 32), (5, 544, 40, 32), (12, 1056, 40, 32), (24, 288, 40, 32),
                           (40, 2080, 24, 32)]:
            c, r = quant_case(rng, op, M, K, N, torch.float16 if M % 2 else torch.bfloat16, group=g)
            cases.append(c)
            refs.append(r)
    env = {"REPARAM_SMALL_M_RING": mode, "RK_CPU_CP_ASYNC_EARLY": early}
    assert ring_launched(check(cases, refs, env=env))


RING_MUTATIONS = {
    # waiting for one group fewer: the stage read before its copies landed (the harness lands them at the wait)
    "ring wait": ("small_m_gemm.cuh", "cp_async_wait<kRingStages - 2>();", "cp_async_wait<kRingStages - 1>();"),
    # three slots for four stages in flight: a stage's copy lands in the slot the current stage reads
    "ring slots": ("small_m_gemm.cuh", "(uint32_t(st) % kRingStages) * NG", "(uint32_t(st) % (kRingStages - 1)) * NG"),
    # the partial stage's lanes past the range end copy too: past the last row's end
    "ring tail copy": ("small_m_gemm.cuh", "if (st < nst && (st < full || kt < ke)) {", "if (st < nst) {"),
    # ... or read their slot, never written in a short range (shared memory starts as NaN; every bit
    # pattern of a quantized code decodes to a finite weight, so this one runs on low rank's fp16 factors)
    "ring tail read": ("small_m_gemm.cuh", "cur[j].q = kin ? ld_shared16(src + j * kThreads) : make_uint4(0u, 0u, 0u, 0u);",
                       "cur[j].q = ld_shared16(src + j * kThreads);"),
    # x in the ring (REPARAM_SMALL_M_RING=2, M = 12): no barrier of the warpgroup, so a warp reads
    # rows another warp's copies have not landed yet
    "x ring barrier": ("small_m_gemm.cuh", "        if (wk == 0) warpgroup_bar<1>();\n        else warpgroup_bar<2>();\n", ""),
    # the x tile read without its swizzle (int4: rows of 16 units; int8: of 8)
    "x ring swizzle": ("small_m_gemm.cuh", "+ (i ^ x_swz))", "+ i)"),
    "x ring swizzle int8": ("small_m_gemm.cuh", "+ (i ^ x_swz))", "+ i)"),
    # x rows past M copied (12 rows in a 16-row tile): past x's end
    "x ring rows": ("small_m_gemm.cuh", "const int r = min(xr0 + kXPass * c, M - 1);", "const int r = xr0 + kXPass * c;"),
    # the partial stage's units past the range end copied: past the last row's end
    "x ring tail": ("small_m_gemm.cuh", "if (st < nst && (st < full || xk < ke)) {", "if (st < nst) {"),
}


@pytest.mark.parametrize("name", list(RING_MUTATIONS))
def test_mutated_small_m_ring_is_caught(rng, name):
    # int4, M = 3 on one fake SM, K = 2080: 8 full stages and a partial one, four in the ring; the tail
    # mutations at K = 544 (low rank: K = 136, r = 24): the partial stage is the third (phase 2's: the
    # first), its slot never written before
    if name == "ring tail read":
        cases, refs = lowrank_cases(rng, [(3, 136, 200, 24)], torch.float16)
        c, r = cases[0], refs[0]
    elif name.startswith("x "):
        c, r = quant_case(rng, "int8_linear" if "int8" in name else "int4_linear", 12, 2080, 40, torch.float16)
    else:
        c, r = quant_case(rng, "int4_linear", 3, 544 if "tail" in name else 2080, 40, torch.float16, group=32)
    env = {"REPARAM_SMALL_M_RING": "2" if name.startswith("x ") else "1", "RK_CPU_SMS": "1",
           "REPARAM_LOWRANK_CUBLAS_MIN_M": "0",
           "RK_CPU_CP_ASYNC_EARLY": "1" if name == "ring slots" else "0"}
    results = run_twice(c, env)
    assert within(results, r) and ring_launched([t for _, t in results])
    assert not within(run_twice(c, env, RING_MUTATIONS[name]), r)


@pytest.mark.parametrize("early", ["0", "1"])
def test_lowrank_decode_ring(rng, early):
    # REPARAM_SMALL_M_RING=1: both phases' factors through the shared-memory ring, persistent CTAs
    # running several work units one after another (2 fake SMs), copies landing late or early
    cases, refs = lowrank_cases(rng, [(1, 1064, 200, 24), (12, 256, 72, 16), (40, 1000, 72, 64)], torch.float16)
    env = {"REPARAM_SMALL_M_RING": "1", "RK_CPU_SMS": "2", "RK_CPU_CP_ASYNC_EARLY": early}
    traces = check(cases, refs, env=env, kernel="small_m::Problem")
    assert all(any("cooperative" in line and " smem 0" not in line for line in t) for t in traces)
