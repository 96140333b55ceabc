"""grouped_lowrank_linear's CUDA sources (csrc/grouped_lowrank_linear.cu on grouped_quant.cuh and the small-M loop)
run on the CPU through python_tests/cuda_on_cpu, against float64 per-expert math: ragged ranks in multiples of 8
(row_align 8) on the small-M loop, plain, pivoted and mixed groups, dense experts, rank 0, every tile shape, two
row chunks, split K; the warp-per-output fallback for every other layout; bad layouts read nothing out of bounds;
then mutations that must be caught."""
import shutil

import pytest
import torch

import cuda_on_cpu
import test_grouped_lowrank_op as lowrank
from reparam_kernels.ops.grouped_lowrank_linear import fast_layout, stack_factors
from test_cuda_on_cpu import check, run_or_fault, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

OP = "grouped_lowrank_linear"
LOOP = "grouped_lowrank [with P = {reparam::small_m::Problem<reparam::"


def as_case(args):
    x, offsets, u, v, perm, fo, n, max_rank, align, b = args
    return {"op": OP, "args": [x, offsets, u, v, perm, fo, b], "ints": [n, max_rank, align]}


def case(rng, counts, ranks, K, N, dtype, pivoted, **kw):
    args, want = lowrank.make(rng, counts, ranks, K, N, dtype, pivoted, **kw)
    return as_case(args), want


def run(rng, shapes, dtype, kernel, env=None):
    """check() on the cases; without a switch in env, also: the wrapper's fast_layout (Python's copy of the C++
    conditions, which sends the other layouts to Triton) says small-M loop exactly where the C++ op launched it."""
    cases, refs = zip(*[case(rng, counts, ranks, K, N, dtype, piv, **kw) for counts, ranks, K, N, piv, kw in shapes])
    traces = check(list(cases), list(refs), env=env, kernel=kernel)
    if env is None or env == {"RK_CPU_SMS": "4"}:
        for c, t in zip(cases, traces):
            x, offsets, u, v, perm, fo, b = c["args"]
            args = (x, offsets, u, v, perm, fo, *c["ints"], b)
            assert fast_layout(*args) == any("grouped_lowrank [" in line for line in t), t
    return traces


# (counts, ranks, K, N, pivoted, kw): T = 1 and 2 (the transposed tile), 5 with a tail row, 16, 17..32, 33..64 and
# 70 rows of one expert (two chunks); rank 0, an expert without rows, a rank past one 128-column block (136), pivoted,
# plain and mixed groups; a pivoted expert with rank K (w empty: its product is the pivot columns alone)
SMALL_M = [([0, 1, 0], [8, 16, 24], 64, 40, False, {}),
           ([1, 0, 1], [16, 0, 8], 96, 72, True, {"bias": False}),
           ([3, 0, 1], [24, 8, 136], 160, 48, "mixed", {"tail": 1}),
           ([9, 0, 7], [8, 32, 16], 128, 264, True, {}),
           ([20, 1, 0], [16, 24, 8], 64, 24, False, {"tail": 4}),
           ([40, 17], [40, 64], 64, 56, "mixed", {"tail": 7}),
           ([0, 70, 3, 27], [8, 24, 0, 16], 48, 40, True, {}),
           ([2, 3], [8, 32], 32, 40, True, {})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_ranks_on_the_small_m_loop(rng, dtype):
    traces = run(rng, SMALL_M, dtype, LOOP, env={"RK_CPU_SMS": "4"})
    for (_, _, _, _, piv, _), t in zip(SMALL_M, traces):
        frag = "grouped_lowrank::ExpertPivotFrag" if piv else "small_m::HalfFrag"
        assert any(LOOP + frag in line for line in t), (frag, t)


def test_dense_experts_join_the_loop(rng):
    """Experts a rank allocation kept dense (stack_factors: N >= K as u = W, w empty, the identity perm; N < K as
    u = I, v = W) beside a pivoted low-rank one, on the small-M loop."""
    K = 32
    cases, refs = [], []
    for N in (40, 24):
        x = torch.randn(9, K, generator=rng).half()
        wd = torch.randn(N, K, generator=rng).half()
        ul, vl = torch.randn(N, 8, generator=rng).half(), (torch.randn(8, K - 8, generator=rng) / 4).half()
        pl = torch.randperm(K, generator=rng)
        dense = (wd, torch.zeros(K, 0).half(), torch.arange(K)) if N >= K else (torch.eye(N).half(), wd, None)
        u, v, perm, fo, r, align = stack_factors([ul, dense[0]], [vl, dense[1]], [pl, dense[2]])
        assert align == 8
        right = torch.zeros(8, K, dtype=torch.float64)
        right[:, pl[:8]] = torch.eye(8, dtype=torch.float64)
        right[:, pl[8:]] = vl.double()
        refs.append(torch.cat([x[:4].double() @ (ul.double() @ right).t(), x[4:].double() @ wd.double().t()]))
        cases.append(as_case((x, torch.tensor([0, 4, 9]), u, v, perm, fo, N, r, align, None)))
    check(cases, refs, kernel=LOOP + "grouped_lowrank::ExpertPivotFrag")


SPLIT_ENV = {"RK_CPU_SMS": "16", "RK_CPU_SEED": "3"}


@pytest.mark.parametrize("pivoted", [False, True])
def test_split_k_runs_twice(rng, pivoted):
    """K split over CTAs in both steps (counters per expert, chunk and column, left at zero: the second run)."""
    c, r = case(rng, [2, 0, 1], [16, 8, 200], 1056, 256, torch.float16, pivoted)
    results = run_twice(c, SPLIT_ENV)
    assert within(results, r)
    grids = [line.split("grid (")[1].split(")")[0].split(",") for _, t in results for line in t
             if "grouped_lowrank [" in line]
    assert len(grids) == 4 and all(int(g[1]) > 1 for g in grids), grids


# odd ranks (row_align 1), ranks in multiples of 4 (row_align 4), K not a multiple of 8, mixed groups, a tail
FALLBACK = [([3, 0, 5, 1], [5, 9, 0, 17], 45, 37, "mixed", {}), ([20, 1, 0], [33, 8, 3], 70, 29, True, {"tail": 4}),
            ([1] * 6, [4, 8, 12, 4, 8, 4], 24, 19, False, {"tail": 1}), ([2, 3], [8, 16], 60, 24, True, {})]


def test_fallback_where_the_layout_does_not_fit(rng):
    traces = run(rng, FALLBACK, torch.float16, "grouped_lowrank_dec_t")
    assert all("grouped_lowrank [" not in line for t in traces for line in t), traces


def test_fallback_when_switched_off(rng):
    run(rng, SMALL_M[:4], torch.bfloat16, "grouped_lowrank_dec_y", env={"REPARAM_GROUPED_SMALL_M": "0"})


@pytest.mark.parametrize("switch", [None, "0"])
def test_bad_layouts_read_nothing_outside(rng, switch):
    """Factor offsets past v or negative, a rank boundary off the 8-element grid, a rank past max_rank, pivots
    outside [0, K) (bugs the kernels cannot see without a host sync; the tensors are guard-paged): nothing is read
    outside a tensor, the outputs are finite, and the experts the bug does not touch come out right."""
    env = {"REPARAM_GROUPED_SMALL_M": switch} if switch else {}
    args, want = lowrank.make(rng, [3, 4, 2], [8, 16, 8], 64, 40, torch.float16, True)
    x, offsets, u, v, perm, fo, n, r, align, b = args
    # (row, expert, new value or added, experts touched): expert 2's w far past v (expert 1's segment then reads
    # as plain); expert 1's w at -80; ranks 13 and 3 (offsets off the grid); expert 2's u past u, expert 1's rank
    # 1016 clamped to max_rank
    edits = [(1, 2, lambda t: t + 10 ** 6, [1, 2]), (1, 1, lambda t: -80, [0, 1]), (0, 2, lambda t: t + 5, [1, 2]),
             (0, slice(2, None), lambda t: t + 1000, [1, 2])]
    cases, touched = [], []
    for row, e, edit, hit in edits:
        f = fo.clone()
        f[row, e] = edit(f[row, e])
        cases.append(as_case((x, offsets, u, v, perm, f, n, r, align, b)))
        touched.append(hit)
    wild = perm.clone()
    wild[0, :3] = torch.tensor([-5, 10 ** 9, 64])  # clamped to [0, K): expert 0 wrong, nothing read outside x
    cases.append(as_case((x, offsets, u, v, wild, fo, n, r, align, b)))
    touched.append([0])
    results = cuda_on_cpu.run_cases(cases, env)
    for (y, _), hit in zip(results, touched):
        assert torch.isfinite(y).all()
        for e in set(range(3)) - set(hit):
            lo, hi = offsets[e].item(), offsets[e + 1].item()
            assert within([(y[lo:hi], None)], want[lo:hi]), e


# (file, old, new) edits applied together
MUTATIONS = {
    # step 2 reads t rows the widest expert's rank long, step 1 wrote each expert's own
    "t row length": [("grouped_lowrank_linear.cu", "    p.K = ex.rank;\n", "    p.K = f.max_rank;\n")],
    # every expert's bias taken as expert 0's
    "bias of the expert": [("grouped_lowrank_linear.cu", "if (p.bias != nullptr) p.bias += int64_t(e) * p.N;", "")],
    # a pivoted expert's pivots counted as the widest rank's
    "pivot count": [("grouped_lowrank_linear.cu", "p.frag.r = f.K - ex.k;", "p.frag.r = f.max_rank;")],
    # each chunk's split counters shared by every expert
    "counters per expert": [("grouped_lowrank_linear.cu",
                             "if (p.splits > 1) p.counters += (int64_t(e) * rows.chunks + c) * p.columns;", "")],
    # the fallback's step 2 reading t past the expert's rank
    "fallback rank": [("grouped_lowrank_linear.cu", "for (int64_t j = lane; j < ex.rank; j += 32) acc +=",
                       "for (int64_t j = lane; j < f.max_rank; j += 32) acc +=")],
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutations_are_caught(rng, name):
    env = dict(SPLIT_ENV, REPARAM_GROUPED_SMALL_M="0") if name.startswith("fallback") else SPLIT_ENV
    c, r = case(rng, [2, 0, 3], [16, 8, 32], 1056, 128, torch.float16, True)
    assert within(cuda_on_cpu.run_cases([c], env), r)  # unmutated
    assert not within(run_or_fault([c], env, MUTATIONS[name]), r)  # (a read outside every tensor is caught too)
