"""grouped_int4_linear, grouped_int8_linear and grouped_lut_linear's CUDA sources (csrc/grouped_quant.cuh and the ops'
units) run on the CPU through python_tests/cuda_on_cpu, against float64 per-expert math: the small-M grouped kernel at every tile
shape (rows of an expert in several chunks past 64, experts without rows, rows no expert takes, offsets past T, split
K run twice so a counter left set shows), the fallback kernel where the layout does not fit the loop; then mutations
that must be caught."""
import shutil

import pytest
import torch

from reparam_kernels import _dispatch, reference
import test_grouped_ops as grouped
from test_cuda_on_cpu import check, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

OPS = ["grouped_int4_linear", "grouped_int8_linear", "grouped_lut_linear"]


def case(rng, op, counts, K, N, dtype, group=32, bias=True, tail=0, offsets=None):
    """(case, float64 reference); `offsets` replaces the expert offsets (the reference recomputed for them)."""
    args, want = grouped.make(rng, counts, K, N, dtype, group=group, bias=bias, tail=tail, op=op)
    args = list(args)
    if offsets is not None:
        args[1] = torch.tensor(offsets)
        want = getattr(reference, op)(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args])
    tensors = [a for a in args if not isinstance(a, int)]
    ints = [a for a in args if isinstance(a, int)]
    # "fast": the wrapper's copy of the C++ layout conditions (the other layouts go to Triton)
    return {"op": op, "args": tensors, "ints": ints, "fast": _dispatch.REGISTRY[op].fast_layout(*args)}, want


def run(rng, shapes, dtype, kernel, env=None):
    cases, refs = [], []
    for op in OPS:
        for counts, K, N, kw in shapes:
            c, r = case(rng, op, counts, K, N, dtype, **kw)
            cases.append(c)
            refs.append(r)
    return check(cases, refs, env=env, kernel=kernel)


# T = rows of x: 1 and 2 (decode, top-1 / top-2: the transposed tile), 5 with a tail, 16, 17..32, 33..64, and past 64
# (an expert's 70 rows in two chunks of the 64-row tile); experts without rows; odd N; group 64 and 128
SMALL_M = [([0, 1, 0], 64, 33, {}), ([1, 0, 1], 96, 70, {"bias": False}), ([3, 0, 1], 128, 65, {"tail": 1}),
           ([9, 0, 7], 256, 40, {"group": 128}), ([20, 1, 0], 64, 72, {"tail": 4}),
           ([40, 17], 160, 24, {"tail": 7, "group": 32}), ([0, 70, 3, 27], 64, 40, {"group": 64})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_m_grouped_kernel(rng, dtype):
    run(rng, SMALL_M, dtype, "small_m_grouped", env={"RK_CPU_SMS": "4"})
    assert all(case(rng, op, *shape[:3], dtype, **shape[3])[0]["fast"] for op in OPS for shape in SMALL_M)


SPLIT_ENV = {"RK_CPU_SMS": "16", "RK_CPU_SEED": "3"}


def test_split_k_runs_twice(rng):
    # K = 2080 on 16 fake SMs, 3 experts that may hold rows: split K; a second launch in the same process sees the
    # counters back at zero
    for op in OPS:
        c, r = case(rng, op, [2, 0, 1], 2080, 72, torch.float16)
        results = run_twice(c, SPLIT_ENV)
        assert within(results, r)
        grids = [line.split("grid (")[1].split(")")[0].split(",") for _, t in results for line in t
                 if "small_m_grouped" in line]
        assert grids and all(int(g[1]) > 1 for g in grids), grids


def test_offsets_past_the_rows_are_clamped(rng):
    # expert 1's range ends past T = 6, expert 2 starts past it: rows 2..5 through expert 1, nothing for expert 2
    for op in OPS:
        c, r = case(rng, op, [2, 4, 0], 64, 24, torch.float16, offsets=[0, 2, 10, 12])
        check([c], [r], kernel="small_m_grouped")


def test_chunks_on_x_where_the_grid_is_short(rng):
    # grid z capped at 8 CTAs for 4 experts: 2 chunks an expert along z, the rest along x (expert 3's 140 rows: 3)
    cases, refs = [], []
    for op in OPS:
        c, r = case(rng, op, [0, 70, 3, 140], 64, 40, torch.float16, tail=2)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, kernel="small_m_grouped",
                   mutations=[("grouped_quant.cuh", "kMaxGridZ = 65535;", "kMaxGridZ = 8;")])
    grids = [line.split("grid (")[1].split(")")[0].split(",") for t in traces for line in t]
    assert all(g[0] == "2" and g[2] == "8" for g in grids), grids  # (one column block of 64 rows a layer)


FALLBACK = [  # int8 rows of 100 bytes (not a multiple of 16), int4 in groups of 96 (not a power of two)
    ("grouped_int8_linear", [3, 0, 5], 100, 33, {"tail": 2}),
    ("grouped_int4_linear", [3, 0, 5], 192, 33, {"tail": 2, "group": 96}),
    ("grouped_lut_linear", [3, 0, 5], 100, 33, {"tail": 2}),  # code rows of 50 bytes
]


def test_fallback_where_the_layout_does_not_fit(rng):
    cases, refs = [], []
    for op, counts, K, N, kw in FALLBACK:
        c, r = case(rng, op, counts, K, N, torch.float16, **kw)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, kernel="grouped_dec_kernel")
    assert not any("small_m_grouped" in line for t in traces for line in t)
    assert not any(c["fast"] for c in cases)


def test_fallback_when_switched_off_or_x_misaligned(rng):
    cases, refs = [], []
    for op in OPS:
        c, r = case(rng, op, [5, 0, 2], 64, 40, torch.bfloat16, tail=1)
        cases.append(c)
        refs.append(r)
    check(cases, refs, env={"REPARAM_GROUPED_SMALL_M": "0"}, kernel="grouped_dec_kernel")
    for c in cases:
        c["offsets"] = {0: 2}  # x 2 bytes off its 16-byte alignment
    check(cases, refs, kernel="grouped_dec_kernel")


MUTATIONS = {
    # every expert reading expert 0's weights
    "row base": ("grouped_quant.cuh", "p.row_base = uint32_t(e) * uint32_t(p.N);", "p.row_base = 0;"),
    # the bias of expert 0 for every expert
    "bias": ("grouped_quant.cuh", "if (p.bias != nullptr) p.bias += int64_t(e) * p.N;", ""),
    # the (expert, chunk) pairs sharing one set of split-K counters
    "counters": ("grouped_quant.cuh", "    p.counters += (int64_t(e) * rows.chunks + c) * p.columns;\n", ""),
    # int8's per-channel scale of the expert-local row
    "out scale": ("small_m_gemm.cuh", "frag.out_scale(p.row_base + n)", "frag.out_scale(n)"),
    # lut's tables (registers, per row) of the expert-local row: expert 0's tables for every expert
    "row state": ("small_m_gemm.cuh", "rs[j] = frag.row_state(p.row_base + min(", "rs[j] = frag.row_state(min("),
    # a chunk of an expert's rows starting at the expert's first row
    "chunk rows": ("grouped_quant.cuh", "const int64_t r0 = lo + c * rows_per_tile<MT>();",
                   "const int64_t r0 = lo + c * 0;"),
    # an expert's rows clamped to no more than the tile: rows past the tile's would be lost
    "rows of a chunk": ("grouped_quant.cuh", "p.M = int(min(hi - r0, int64_t(rows_per_tile<MT>())));",
                        "p.M = int(min(hi - lo, int64_t(rows_per_tile<MT>())));"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutations_are_caught(rng, name):
    op = {"out scale": "grouped_int8_linear", "row state": "grouped_lut_linear"}.get(name, "grouped_int4_linear")
    counts, K = ([0, 70, 3], 64) if name in ("chunk rows", "rows of a chunk") else ([2, 0, 1], 2080)
    c, r = case(rng, op, counts, K, 72, torch.float16)
    assert within(run_twice(c, SPLIT_ENV), r)  # unmutated
    assert not within(run_twice(c, SPLIT_ENV, MUTATIONS[name]), r)
