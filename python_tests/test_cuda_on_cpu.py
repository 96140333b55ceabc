"""The CUDA ops' real sources (csrc/: host planning and kernels) executed on the CPU through
python_tests/cuda_on_cpu (fibers per CUDA thread, warp collectives and mma fragments from all 32
lanes, cp.async landing only at the wait, guard-paged tensors), against float64, on every path
each op can take; the launch trace says which path ran. Then mutations of the sources (a wrong
slot map, a missing barrier or wait, an off-by-one split counter, a missing bounds check, a
divergent barrier; for wgmma a missing wait, swapped descriptor strides, an unguarded buffer
refill, an off-by-one split counter, x in the wrong slot order) must each be caught — the
harness can fail. The block-circulant / Toeplitz kernels: test_cuda_on_cpu_circulant.py; the quantized
ops' dequantize + cuBLAS path: test_cuda_on_cpu_dequant.py."""
import shutil

import pytest
import torch

import cuda_on_cpu
import test_lowrank_op as plain
import test_pivoted_lowrank as piv
import test_quant_ops as quant
from conftest import TOL, rel_err

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

QUANT = ["int4_linear", "int8_linear", "lut_linear"]


def quant_case(rng, op, M, K, N, dtype, group=32, bias=True):
    args, w = quant.make(op, rng, (M,), K, N, dtype, group=group, bias=bias,
                         tables=N // 8 if N % 8 == 0 else 1)
    tensors = [a for a in args if not isinstance(a, int)]
    ints = [a for a in args if isinstance(a, int)]
    return {"op": op, "args": tensors, "ints": ints}, quant.exact(args, w)


def check(cases, refs, env=None, kernel=None, mutations=()):
    """Runs the cases in one process; every output within tolerance of float64, and (kernel) every
    case launched a kernel whose trace line contains that text. Returns the traces. The low-rank ops
    keep their fused kernels at every M unless `env` says otherwise (by default M >= 2 takes two cuBLAS
    products: lowrank_large_m.cuh), since those kernels are what this harness checks."""
    env = {"REPARAM_LOWRANK_CUBLAS_MIN_M": "0", **(env or {})}
    results = cuda_on_cpu.run_cases(cases, env, mutations)
    for case, ref, (y, trace) in zip(cases, refs, results):
        tol = TOL[case["args"][0].dtype]
        assert torch.isfinite(y).all(), (case["op"], trace)
        err = rel_err(y, ref)
        assert err <= tol, (case["op"], tuple(case["args"][0].shape), err, trace)
        if kernel is not None:
            assert any(kernel in line for line in trace), (kernel, trace)
    return [t for _, t in results]


# ------------------------------------------------------------------ quantized ops

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_small_m_path(rng, dtype):
    # register-fed mma.sync path (csrc/small_m_gemm.cuh): M <= 64, all four tile shapes (M = 1, 5: the
    # transposed one), split K
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g in [(1, 544, 72, 32), (5, 1056, 100, 32), (16, 512, 264, 64), (17, 256, 40, 128),
                           (33, 128, 72, 32), (64, 160, 24, 32)]:
            c, r = quant_case(rng, op, M, K, N, dtype, group=g, bias=M % 2 == 1)
            cases.append(c)
            refs.append(r)
    check(cases, refs, kernel="small_m::Problem")


def test_quant_small_m_untransposed(rng):
    # REPARAM_SMALL_M_T=0: M <= 8 on the M <= 16 tile (the A/B switch of the transposed one)
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g in [(1, 544, 72, 32), (7, 256, 40, 128)]:
            c, r = quant_case(rng, op, M, K, N, torch.bfloat16, group=g, bias=True)
            cases.append(c)
            refs.append(r)
    check(cases, refs, env={"REPARAM_SMALL_M_T": "0"}, kernel="small_m::Problem")


@pytest.mark.parametrize("sms,per_sm", [(1, 1), (16, 2)])
def test_quant_small_m_split_plans(rng, sms, per_sm):
    # another fake GPU: other column x split-K plans; the same op twice in a row (the arrival counters
    # must be back at zero after each launch)
    cases, refs = [], []
    for op in QUANT:
        c, r = quant_case(rng, op, 3, 2048, 96, torch.float16, group=128)
        cases += [c, c]
        refs += [r, r]
    env = {"RK_CPU_SMS": str(sms), "RK_CPU_BLOCKS_PER_SM": str(per_sm), "RK_CPU_SEED": "7"}
    check(cases, refs, env, kernel="small_m::Problem")


def test_h200_sized_grids(rng):
    # the H200's 132 SMs, 2 resident CTAs each: the plans the GPU will see (many splits of K; a
    # cooperative low-rank launch of 264 blocks, most of them without work in phase 2)
    cases, refs = [], []
    for op in QUANT:
        c, r = quant_case(rng, op, 1, 4096, 256, torch.float16, group=128)
        cases.append(c)
        refs.append(r)
    x, u, v, b = plain.make(rng, (3,), 4096, 520, 64, torch.bfloat16)
    cases.append({"op": "lowrank_linear", "args": [x, u, v, b]})
    refs.append(plain.exact(x, u, v, b))
    c, r = quant_case(rng, "int4_linear", 100, 1024, 520, torch.float16, group=128)  # wgmma, K split 8 ways
    cases.append(c)
    refs.append(r)
    traces = check(cases, refs, env={"RK_CPU_SMS": "132", "RK_CPU_BLOCKS_PER_SM": "2"})
    assert "grid (2,16,1)" in traces[0][0] and "grid (264,1,1)" in traces[3][0] and "cooperative" in traces[3][0]
    assert "wgmma_kernel" in traces[4][1] and "grid (1,5,8)" in traces[4][1]


def test_split_fixup_shared_by_threads(rng):
    # A narrow tile with many K splits on the H200's grid (M = 1: 128 outputs per column block, 32-64
    # splits): the last CTA's threads share each output's splits two ways and meet in shared memory.
    # Dropping the second share is caught, so the shared sum is what ran.
    cases, refs = [], []
    for op in ("int4_linear", "int8_linear"):
        c, r = quant_case(rng, op, 1, 8192, 100, torch.float16, group=128)
        cases.append(c)
        refs.append(r)
    x, u, v, b = plain.make(rng, (1,), 4096, 200, 64, torch.float16)
    cases.append({"op": "lowrank_linear", "args": [x, u, v, b]})
    refs.append(plain.exact(x, u, v, b))
    env = {"RK_CPU_SMS": "132", "RK_CPU_BLOCKS_PER_SM": "2"}
    traces = check(cases, refs, env=env)
    assert "grid (1,32,1)" in traces[0][0] and "grid (1,64,1)" in traces[1][0], traces
    mutation = ("split_k_counters.h", "for (int q = 1; q < P; ++q)", "for (int q = 1; q < P - 1; ++q)")
    mutated = cuda_on_cpu.run_cases(cases, {**env, "REPARAM_LOWRANK_CUBLAS_MIN_M": "0"}, [mutation])
    for (y, _), ref in zip(mutated, refs):
        assert not torch.isfinite(y).all() or rel_err(y, ref) > TOL[torch.float16]


def test_quant_general_path(rng):
    # REPARAM_SMALL_M=0: the GEMV (M <= 8) and the WMMA tiles (M > 8), odd K for int8, a non-power-of-two group
    cases, refs = [], []
    for op in QUANT:
        for M, K, N in [(1, 1024 + 64, 70), (3, 256, 33), (9, 320, 65), (40, 192, 130)]:
            c, r = quant_case(rng, op, M, K, N, torch.float16)
            cases.append(c)
            refs.append(r)
    for M, K in [(2, 37), (20, 130)]:
        c, r = quant_case(rng, "int8_linear", M, K, 50, torch.bfloat16)
        cases.append(c)
        refs.append(r)
    c, r = quant_case(rng, "int4_linear", 4, 288, 40, torch.float16, group=96)
    cases.append(c)
    refs.append(r)
    traces = check(cases, refs, env={"REPARAM_SMALL_M": "0"})
    assert any("gemv_kernel" in line for t in traces for line in t)
    assert any("mma_kernel" in line for t in traces for line in t)


def test_quant_misaligned_x_takes_general_path(rng):
    cases, refs = [], []
    for op in QUANT:
        c, r = quant_case(rng, op, 2, 256, 40, torch.float16)
        c["offsets"] = {0: 2}  # x starts 2 bytes off a 16-byte boundary
        cases.append(c)
        refs.append(r)
    for t in check(cases, refs):
        assert not any("small_m::Problem" in line for line in t) and any("gemv_kernel" in line for line in t)


# wgmma's whole range for the cases below (by default M >= 129 dequantizes)
WGMMA_RANGE = {"REPARAM_DEQUANT_MIN_M": "512"}


def wgmma_cases(rng):
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g, dtype in [(65, 128, 72, 32, torch.float16), (130, 384, 200, 128, torch.bfloat16),
                                  (200, 160, 33, 32, torch.float16)]:  # K not a multiple of the 128-k stage
            c, r = quant_case(rng, op, M, K, N, dtype, group=g, bias=M % 2 == 0)
            cases.append(c)
            refs.append(r)
    return cases, refs


@pytest.mark.parametrize("bn", ["128", "64"])
def test_quant_wgmma_path(rng, bn):
    # Hopper, 64 < M < 512 (csrc/quant_wgmma.cuh): x put in slot order, decoded weights as wgmma's A
    # operand; one or two warpgroups per CTA; cp.async landing late (default) and early
    cases, refs = wgmma_cases(rng)
    check(cases, refs, env={"REPARAM_WGMMA_BN": bn, **WGMMA_RANGE}, kernel="wgmma_kernel<")
    check(cases[:3], refs[:3], env={"REPARAM_WGMMA_BN": bn, "RK_CPU_CP_ASYNC_EARLY": "1", **WGMMA_RANGE},
          kernel="wgmma_kernel<")
    # REPARAM_WGMMA_MIN_M=1: the 64-row batch tiles at decode sizes (the small-M path's range)
    small, small_refs = [], []
    for op in QUANT:
        for M in (1, 17, 64):
            c, r = quant_case(rng, op, M, 256, 72, torch.bfloat16, group=64)
            small.append(c)
            small_refs.append(r)
    check(small, small_refs, env={"REPARAM_WGMMA_BN": bn, "REPARAM_WGMMA_MIN_M": "1"}, kernel="wgmma_kernel<")


def test_quant_wgmma_only_on_hopper_and_when_on(rng):
    cases, refs = wgmma_cases(rng)
    # (RK_CPU_PTX_VERSION=80: a Hopper GPU, but a build without sm_90a code: the kernel would only trap)
    for env in ({"RK_CPU_CC_MAJOR": "8"}, {"REPARAM_WGMMA": "0"}, {"RK_CPU_PTX_VERSION": "80"}):
        for t in check(cases[:3], refs[:3], env={**env, **WGMMA_RANGE}):
            assert not any("wgmma_kernel" in line for line in t) and any("mma_kernel" in line for line in t)
    for c in cases[:3]:
        c["offsets"] = {0: 2}  # x 2 bytes off 16-byte alignment: the WMMA tiles instead
    for t in check(cases[:3], refs[:3], env=WGMMA_RANGE):
        assert not any("wgmma_kernel" in line for line in t) and any("mma_kernel" in line for line in t)


# ------------------------------------------------------------------ low-rank ops

def lowrank_cases(rng, shapes, dtype):
    cases, refs = [], []
    for M, K, N, r in shapes:
        x, u, v, b = plain.make(rng, (M,), K, N, r, dtype)
        cases.append({"op": "lowrank_linear", "args": [x, u, v, b]})
        refs.append(plain.exact(x, u, v, b))
        x, u, w, perm, b = piv.make(rng, (M,), K, N, r, dtype)
        cases.append({"op": "pivoted_lowrank_linear", "args": [x, u, w, perm, None]})
        refs.append(piv.exact(x, u, w, perm, None))
    return cases, refs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowrank_decode_path(rng, dtype):
    # both products in one cooperative launch (csrc/lowrank_small_m.cuh); (48, 40, 40): K - r = 8
    cases, refs = lowrank_cases(rng, [(1, 136, 200, 24), (12, 256, 72, 16), (17, 1000, 72, 64), (64, 48, 40, 40)],
                                dtype)
    check(cases, refs, env={"RK_CPU_BLOCKS_PER_SM": "2"}, kernel="small_m::Problem")


def test_lowrank_wmma_path(rng):
    # the WMMA kernel (csrc/lowrank_linear.cu): all three tile configs, odd K / r (no cp.async path)
    cases, refs = lowrank_cases(rng, [(3, 136, 200, 24), (40, 100, 70, 13), (100, 64, 33, 16)], torch.float16)
    check(cases, refs, env={"REPARAM_SMALL_M": "0", "REPARAM_WGMMA": "0"}, kernel="LowRankArgs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowrank_wgmma_path(rng, dtype):
    # Hopper, 64 < M < 512 (csrc/lowrank_wgmma.cuh): both products through the wgmma GEMM, pivoted
    # factors gathered in the slot-order pass; odd r (13) and K - r not a multiple of 8 fall back
    cases, refs = lowrank_cases(rng, [(65, 136, 200, 24), (300, 48, 40, 40), (130, 1000, 72, 64)], dtype)
    traces = check(cases, refs, kernel="wgmma_kernel<")
    assert all(sum("wgmma_kernel<" in line for line in t) == 2 for t in traces)  # two products each
    cases, refs = lowrank_cases(rng, [(100, 100, 70, 13)], dtype)
    for t in check(cases, refs):
        assert any("LowRankArgs" in line for line in t)
    cases, refs = lowrank_cases(rng, [(65, 136, 200, 24)], dtype)  # a build without sm_90a code
    for t in check(cases, refs, env={"RK_CPU_PTX_VERSION": "80"}):
        assert not any("wgmma_kernel" in line for line in t) and any("LowRankArgs" in line for line in t)


def test_lowrank_two_gemm_path(rng):
    cases, refs = lowrank_cases(rng, [(70, 136, 50, 24)], torch.bfloat16)
    traces = check(cases, refs, env={"REPARAM_LOWRANK_CUBLAS_MIN_M": "65"})
    assert any("expand_kernel" in line for line in traces[1])  # pivoted: [I | w] P expanded first
    # the default thresholds (measured on the H200): plain factors take the two products at every M, M = 1
    # included; pivoted ones from M = 2, their fused kernel at M = 1
    cases, refs = lowrank_cases(rng, [(2, 136, 50, 24), (1, 136, 50, 24)], torch.float16)
    traces = check(cases, refs, env={"REPARAM_LOWRANK_CUBLAS_MIN_M": ""})
    fused = [any("small_m::" in line for line in t) for t in traces]
    assert fused == [False, False, False, True]  # (plain M = 2, pivoted M = 2, plain M = 1, pivoted M = 1)
    # pivoted M = 2, r = 24: x's columns gathered (3 M <= 2 r), w never expanded
    assert all(any("gather_kernel" in line for line in traces[i]) == (i == 1) for i in range(4))
    assert not any("expand_kernel" in line for t in traces for line in t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pivoted_two_gemm_gathers_x_at_small_m(rng, dtype):
    # (M, K, N, r): gathered where 3 M <= 2 r, expanded where not, and both forced (REPARAM_PIVOTED_GATHER);
    # K - r odd, r = K - 1 (one gathered column), r = K (nothing to gather: always expanded)
    shapes = [(2, 136, 50, 24), (16, 300, 70, 64), (5, 257, 33, 250), (3, 40, 24, 39), (4, 40, 24, 40), (40, 136, 50, 24)]
    cases, refs = lowrank_cases(rng, shapes, dtype)
    cases, refs = cases[1::2], refs[1::2]  # the pivoted ones
    for gather, want in (("", [True, True, True, True, False, False]), ("1", [True] * 4 + [False, True]),
                         ("0", [False] * 6)):
        traces = check(cases, refs, env={"REPARAM_LOWRANK_CUBLAS_MIN_M": "2", "REPARAM_PIVOTED_GATHER": gather})
        got = [any("gather_kernel" in line for line in t) for t in traces]
        assert got == want, (gather, got)
        assert all(any("expand_kernel" in line for line in t) != g for t, g in zip(traces, got))


def test_pivoted_gather_mutations_are_caught(rng):
    cases, refs = lowrank_cases(rng, [(7, 136, 50, 24)], torch.float16)
    c, ref = cases[1], refs[1]
    env = {"REPARAM_LOWRANK_CUBLAS_MIN_M": "2", "REPARAM_PIVOTED_GATHER": "1", "RK_CPU_SMS": "2"}
    assert within(run_twice(c, env), ref)
    for mutation in [("lowrank_large_m.cuh", "const int64_t q = perm[r + c];", "const int64_t q = perm[c];"),
                     ("lowrank_large_m.cuh", "tm[j] = from_f32<T>(to_f32<T>(tm[j]) + (q >= 0",
                      "tm[j] = from_f32<T>(to_f32<T>(tm[j]) * (q >= 0"),
                     ("lowrank_large_m.cuh", "for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {\n    const T* xm = x + m * K;\n    T* tm",
                      "for (int64_t m = blockIdx.y; m < M - 1; m += gridDim.y) {\n    const T* xm = x + m * K;\n    T* tm")]:
        assert not within(run_twice(c, env, mutation), ref), mutation


def test_pivoted_expansion_mutations_are_caught(rng):
    # The two-product route's expansion of [I | w] P (lowrank_large_m.cuh): one row past v, or perm's inverse
    # written as the identity, must show (a fault outside every tensor, or a wrong result)
    cases, refs = lowrank_cases(rng, [(70, 136, 50, 24)], torch.float16)
    c, ref = cases[1], refs[1]  # the pivoted case
    env = {"REPARAM_LOWRANK_CUBLAS_MIN_M": "65", "RK_CPU_SMS": "2"}
    assert within(run_twice(c, env), ref)
    for mutation in [("lowrank_large_m.cuh", "j < r; j += gridDim.y", "j <= r; j += gridDim.y"),
                     ("lowrank_large_m.cuh", "inv[q] = int32_t(c);", "inv[q] = int32_t(q);")]:
        assert not within(run_twice(c, env, mutation), ref), mutation


def test_lowrank_decode_prefetches_u_within_bounds(rng):
    # With REPARAM_LOWRANK_PREFETCH_U=1 (off by default since run 3 timed it slower) the decode launch
    # prefetches phase 2's factor u into L2 before phase 1 (every prefetched address is read by the model: one
    # past u faults). A prefetch one row past each unit's rows reaches past u's last row, and is caught; with
    # the prefetch off (the default, or 0), or u more than half the (fake) L2, the same mutation never runs.
    cases, refs = lowrank_cases(rng, [(1, 136, 200, 24)], torch.float16)
    c, ref = cases[0], refs[0]  # plain factors (the pivoted case's phase 2 is the same)
    mutation = ("lowrank_small_m.cuh", "const int rows = int(min(int64_t(BN), p.N - col0));",
                "const int rows = int(min(int64_t(BN), p.N - col0 + 1));")
    env = {"REPARAM_LOWRANK_CUBLAS_MIN_M": "0", "RK_CPU_SMS": "1", "REPARAM_LOWRANK_PREFETCH_U": "1"}
    assert within(run_twice(c, env), ref)
    assert run_twice(c, env, mutation) is None
    u_bytes = 200 * 24 * 2
    for off in ({"REPARAM_LOWRANK_PREFETCH_U": ""}, {"REPARAM_LOWRANK_PREFETCH_U": "0"},
                {"RK_CPU_L2_BYTES": str(2 * u_bytes - 2)}):
        assert within(run_twice(c, {**env, **off}, mutation), ref), off
    assert run_twice(c, {**env, "RK_CPU_L2_BYTES": str(2 * u_bytes)}, mutation) is None  # u = half the L2


# ------------------------------------------------------------------ the harness catches bugs

MUTATIONS = {
    # int4's A operand built with the wrong byte permute: x no longer follows the weights' slot map
    "slot map": ("int4_format.cuh", "a[0] = __byte_perm(word(r0, h), word(r0, h + 2), 0x5410);",
                 "a[0] = __byte_perm(word(r0, h), word(r0, h + 2), 0x5432);"),
    # the K-warp partials read before the other warps wrote them
    "missing barrier": ("small_m_gemm.cuh", "  __syncthreads();\n  if (wk == 0) {", "  if (wk == 0) {"),
    # the split-K arrival counter's limit off by one: no CTA sees itself as last
    "split counter": ("split_k_counters.h", "atomicInc(counter, unsigned(splits - 1))",
                      "atomicInc(counter, unsigned(splits))"),
    # weight rows past N not clamped: reads run off the end of qweight
    "row clamp": ("small_m_gemm.cuh", "wrow[j] = frag.row(p.row_base + min(row0 + 8 * j, uint32_t(N - 1)));",
                  "wrow[j] = frag.row(p.row_base + row0 + 8 * j);"),
    # x rows past M not clamped: reads run off the end of x
    "x row clamp": ("small_m_gemm.cuh", "xm[mt][r] = min(16 * mt + 8 * r + g, M - 1);", "xm[mt][r] = 16 * mt + 8 * r + g;"),
    # the partial last stage (K = 2080: 32 past a multiple of 128) reads weights past the range end
    "tail weights": ("small_m_gemm.cuh", "c[j] = kin ? frag.load(wrow[j], kt) : Frag::zero();",
                     "c[j] = frag.load(wrow[j], kt);"),
    # ... or x past the range end
    "tail x": ("small_m_gemm.cuh", "const bool kin = !kTail || kt < ke;", "const bool kin = true;"),
    # the transposed tile (M <= 8, as here): A's rows g + 8 from group 2q instead of 2q + 1 ...
    "transposed A rows": ("small_m_gemm.cuh", "wb(2 * q + 1, w[1], w[3]);", "wb(2 * q, w[1], w[3]);"),
    # ... or its accumulators stored as the untransposed tile's
    "transposed output": ("small_m_gemm.cuh", "const int m = kT ? 2 * t + (c % 2) :", "const int m = kT ? g + 8 * (c / 2) :"),
    # the split fixup's outputs taken a thread's kJ at a time read the wrong partials (K split 5 ways here)
    "fixup outputs": ("split_k_counters.h", "const int e = e0 + j * kThreads;\n      o[j]", "const int e = e0 + j;\n      o[j]"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_small_m_path_is_caught(rng, name):
    # the same op twice in one process: a counter left non-zero shows on the second launch
    c, r = quant_case(rng, "int4_linear", 3, 2080, 40, torch.float16, group=32)
    env = {"RK_CPU_SEED": "3"}
    assert within(run_twice(c, env), r)  # unmutated
    assert not within(run_twice(c, env, MUTATIONS[name]), r)


@pytest.mark.parametrize("name", ["x row clamp", "tail x", "tail weights"])
def test_mutated_m16_tile_is_caught(rng, name):
    # the mutations above run at M = 3 (the transposed tile); those of x's rows and the tail also on
    # the M <= 16 tile's register loop, which M > 8 takes only with the ring off (by default x and the
    # weights go through the ring there: its own mutations in test_cuda_on_cpu_ring.py)
    c, r = quant_case(rng, "int4_linear", 12, 2080, 40, torch.float16, group=32)
    env = {"RK_CPU_SEED": "3", "REPARAM_SMALL_M_RING": "0"}
    assert within(run_twice(c, env), r)
    assert not within(run_twice(c, env, MUTATIONS[name]), r)


def run_or_fault(cases, env, mutations=()):
    """run_cases, or None when the run faulted reading outside every tensor (a fault ends the process with a
    report; a mutation that reads out of bounds is caught that way)."""
    try:
        return cuda_on_cpu.run_cases(cases, env, mutations=mutations)
    except cuda_on_cpu.KernelError as e:
        assert "outside every tensor" in str(e)
        return None


def run_twice(case, env, mutation=None):
    """The case run twice in one process (a counter left non-zero shows on the second launch), or
    None when the run faulted reading outside every tensor."""
    return run_or_fault([case, case], env, [mutation] if mutation else ())


def within(results, ref):
    return results is not None and all(torch.isfinite(y).all() and rel_err(y, ref) <= TOL[torch.float16]
                                       for y, _ in results)


WGMMA_MUTATIONS = {
    # the accumulators read without retiring the wgmma group
    "no wait": ("quant_wgmma.cuh", "    wgmma::wait<0>();\n", ""),
    # the core matrices' two strides swapped in the descriptor
    "descriptor strides": ("quant_wgmma.cuh", "constexpr uint32_t kLbo = 128, kSbo = 256;",
                           "constexpr uint32_t kLbo = 256, kSbo = 128;"),
    # a stage buffer refilled while the other warpgroup's wgmma may still read it (copies landing early)
    "buffer reuse barrier": ("quant_wgmma.cuh", "    __syncthreads();  // every warpgroup is done", "    // every warpgroup is done"),
    # the split-K arrival counter's limit off by one (shows on the second launch)
    "split counter": ("split_k_counters.h", "atomicInc(counter, unsigned(splits - 1))",
                      "atomicInc(counter, unsigned(splits))"),
    # x put in plain instead of the format's slot order
    "slot order": ("quant_wgmma.cuh", "      Frag::a(xv, xv, h, a);", "      small_m::a_consecutive(xv, xv, h, a);"),
    # the x tile's rows past M copied (M = 100 in a 128-row tile): reads run off the end of x
    "x tile rows": ("quant_wgmma.cuh", "const bool ok = i * kXRowStep < x_rows;", "const bool ok = true;"),
    # a thread's chunks one 8-row group apart in shared memory instead of kXRowStep rows
    "x tile stride": ("quant_wgmma.cuh", "cp_async16(dst + i * (kXRowStep / 8) * kSbo,", "cp_async16(dst + i * kSbo,"),
    # stage s + 2's weights loaded over stage s + 1's chunks before those are decoded (wrong parity)
    "chunk buffer parity": ("quant_wgmma.cuh", "load_w(s + kAhead, cw[kOverlap ? p : 1 - p]);",
                            "load_w(s + kAhead, cw[1 - p]);"),
}


@pytest.mark.parametrize("name", list(WGMMA_MUTATIONS))
def test_mutated_wgmma_path_is_caught(rng, name):
    # 16 stages split 2 ways over the fake GPU's 4 SMs (2 tiles): buffers reused, split-K fixups; twice
    c, r = quant_case(rng, "int4_linear", 100, 2048, 130, torch.float16, group=128)
    env = {"RK_CPU_SEED": "5", "RK_CPU_CP_ASYNC_EARLY": "1"}

    results = run_twice(c, env)
    assert "wgmma_kernel" in results[0][1][1] and "grid (1,2,2)" in results[0][1][1] and within(results, r)
    assert not within(run_twice(c, env, WGMMA_MUTATIONS[name]), r)


def test_wgmma_l2_prefetch_stays_inside_the_weights(rng):
    # REPARAM_WGMMA_L2_AHEAD (default 4): the weights of a stage ahead are prefetched into L2; every
    # prefetched address is read by the model. K = 2080 ends in a partial stage, where lanes past K
    # must not prefetch: without that test the last row's lanes reach past qweight's end and fault.
    c, r = quant_case(rng, "int4_linear", 100, 2080, 130, torch.float16, group=32)
    env = {"RK_CPU_SEED": "5", "RK_CPU_SMS": "1"}
    results = run_twice(c, env)
    assert "wgmma_kernel" in results[0][1][1] and within(results, r)
    mutation = ("quant_wgmma.cuh", "if (rows[r] < N && kt < K) prefetch_l2(", "if (rows[r] < N) prefetch_l2(")
    assert run_twice(c, env, mutation) is None
    assert within(run_twice(c, {**env, "REPARAM_WGMMA_L2_AHEAD": "0"}, mutation), r)  # off: never runs


def test_missing_cp_async_wait_is_caught(rng):
    # the WMMA tiles read a shared-memory stage before its copies landed
    cases, refs = lowrank_cases(rng, [(40, 256, 72, 32)], torch.float16)
    mutation = ("gemm_nt_tile.cuh", "      cp_async_wait<1>();\n", "")
    env = {"REPARAM_SMALL_M": "0", "REPARAM_LOWRANK_CUBLAS_MIN_M": "0"}  # M = 40 on the WMMA kernel
    check(cases, refs, env=env, kernel="LowRankArgs")
    y, _ = cuda_on_cpu.run_cases(cases[:1], env, mutations=[mutation])[0]
    assert not (torch.isfinite(y).all() and rel_err(y, refs[0]) <= TOL[torch.float16])


def test_divergent_barrier_is_caught(rng):
    c, _ = quant_case(rng, "int8_linear", 3, 512, 40, torch.float16)
    mutation = ("split_k_counters.h", "  __syncthreads();  // (also:", "  if (threadIdx.x % 64 != 5) __syncthreads();  // (")
    with pytest.raises(cuda_on_cpu.KernelError, match="divergent|deadlock"):
        cuda_on_cpu.run_cases([c], mutations=[mutation])
