"""grouped_vq_linear's CUDA sources (csrc/grouped_vq_linear.cu on grouped_quant.cuh, the formats of vq_format.cuh)
run on the CPU through python_tests/cuda_on_cpu, against float64 per-expert math: pairs (GPTVQ's d = 2) on the
small-M grouped kernel with each CTA's codebooks of its own expert in shared memory, every other layout on the
fallback kernel; then mutations that must be caught."""
import shutil

import pytest
import torch

import cuda_on_cpu
import test_grouped_ops as grouped
from reparam_kernels.ops.grouped_vq_linear import fast_layout
from test_cuda_on_cpu import check, run_or_fault, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

OP = "grouped_vq_linear"


def case(rng, counts, K, N, dtype, **kw):
    args, want = grouped.make(rng, counts, K, N, dtype, op=OP, **kw)
    return {"op": OP, "args": list(args), "ints": []}, want


def run(rng, shapes, dtype, kernel, env=None):
    """check() on the cases; without env, also: the wrapper's fast_layout (Python's copy of the C++ conditions,
    which sends the other layouts to Triton) says small-M loop exactly where the C++ op launched it."""
    cases, refs = zip(*[case(rng, counts, K, N, dtype, **kw) for counts, K, N, kw in shapes])
    traces = check(list(cases), list(refs), env=env, kernel=kernel)
    if env is None or env == {"RK_CPU_SMS": "4"}:
        for c, t in zip(cases, traces):
            assert fast_layout(*c["args"]) == any("small_m_grouped" in line for line in t), t
    return traces


# T = 1 and 2 (the transposed tile), 5 with a tail, 16, 17..32, 33..64 and 70 rows of one expert (two chunks);
# a codebook per 64 rows (two in a 128-row column block), per 35 rows (L = 2 <= the slots), ten codebooks of 64
# rows at N = 640 (later experts' codebooks far into the stack), one codebook of 100 entries (the rest zero)
SMALL_M = [([0, 1, 0], 64, 128, {"books": 2}), ([1, 0, 1], 96, 70, {"bias": False}),
           ([3, 0, 1], 128, 300, {"tail": 1}), ([9, 0, 7], 256, 640, {"books": 10}),
           ([20, 1, 0], 64, 72, {"books": 1, "entries": 100, "tail": 4}), ([40, 17], 160, 24, {"tail": 7}),
           ([0, 70, 3, 27], 64, 128, {"books": 2})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairs_on_the_small_m_grouped_kernel(rng, dtype):
    kernel = "small_m_grouped [with P = {reparam::small_m::Problem<reparam::VqPairFrag"
    run(rng, SMALL_M, dtype, kernel, env={"RK_CPU_SMS": "4"})


SPLIT_ENV = {"RK_CPU_SMS": "16", "RK_CPU_SEED": "3"}


def test_split_k_runs_twice(rng):
    c, r = case(rng, [2, 0, 1], 2080, 128, torch.float16, books=2)
    results = run_twice(c, SPLIT_ENV)
    assert within(results, r)
    grids = [line.split("grid (")[1].split(")")[0].split(",") for _, t in results for line in t
             if "small_m_grouped" in line]
    assert grids and all(int(g[1]) > 1 for g in grids), grids


# every d but pairs, codes not a whole 16 bytes a row (K = 100), a codebook per 4 rows (32 in a column block:
# more than the loop's two shared-memory slots), odd sizes
FALLBACK = [([3, 0, 5], 99, 20, {"d": 3, "books": 5, "tail": 2}), ([1, 4], 96, 36, {"d": 1, "entries": 200}),
            ([2, 0, 6], 128, 33, {"d": 4, "entries": 17}), ([5, 1], 100, 24, {"d": 2}),
            ([3, 0, 5], 64, 40, {"books": 10, "tail": 1}), ([2, 2, 2], 136, 21, {"d": 8, "books": 3})]


def test_fallback_where_the_layout_does_not_fit(rng):
    traces = run(rng, FALLBACK, torch.float16, "grouped_dec_kernel")
    assert all("VqDec" in line and "small_m_grouped" not in line for t in traces for line in t), traces


@pytest.mark.parametrize("switch", ["REPARAM_GROUPED_SMALL_M", "REPARAM_VQ_SMALL_M"])
def test_fallback_when_switched_off(rng, switch):
    run(rng, SMALL_M[:3], torch.bfloat16, "grouped_dec_kernel", env={switch: "0"})


# (file, old, new) edits applied together
MUTATIONS = {
    # each CTA staging its column block's codebooks of expert 0 (tables found by the expert-local row)
    "tables row base": [("small_m_gemm.cuh", "const int64_t table0 = p.row_base + col0;",
                         "const int64_t table0 = col0;"),
                        ("small_m_gemm.cuh", "rs[j] = frag.row_state(tables, table0, p.row_base + min(",
                         "rs[j] = frag.row_state(tables, table0, min(")],
    # the stack's codebooks counted as one expert's: later experts' tables staged as zeros
    "books of the stack": [("grouped_vq_linear.cu", "VqPairFrag<T>{cp, bp, K, rpb, E * L, C}",
                            "VqPairFrag<T>{cp, bp, K, rpb, L, C}")],
    # the fallback's codebook stride of one entry's d coordinates missing
    "fallback book stride": [("grouped_vq_linear.cu", "VqDec<T>{cp, bp, K, rpb, C * d, int(d), vec}",
                              "VqDec<T>{cp, bp, K, rpb, C, int(d), vec}")],
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutations_are_caught(rng, name):
    env = dict(SPLIT_ENV, REPARAM_GROUPED_SMALL_M="0") if name.startswith("fallback") else SPLIT_ENV
    c, r = case(rng, [2, 0, 1], 2080, 256, torch.float16, books=2)
    assert within(cuda_on_cpu.run_cases([c], env), r)  # unmutated
    assert not within(run_or_fault([c], env, MUTATIONS[name]), r)  # (a read outside every tensor is caught too)
