"""int4 with its scales applied after the mma (REPARAM_SMALL_M_POST_SCALE=1: Int4PostFrag in csrc/int4_format.cuh,
the transposed tile's register loop at M <= 8, groups of a multiple of 128), run on the CPU through the real
sources (python_tests/cuda_on_cpu, as test_cuda_on_cpu.py): against float64, with fractional zero points, partial
stages, split K and stream-K, the layouts it does not take falling back to Int4Frag; then mutations that must be
caught."""
import shutil

import pytest
import torch

import cuda_on_cpu
from conftest import rel_err
from reparam_kernels.compress.quantize import pack_int4
from test_cuda_on_cpu import check, quant_case, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

ON = {"REPARAM_SMALL_M_POST_SCALE": "1"}
# The post-scaled sum rounds only the fp32 sums and the output: its error is the output's rounding (measured on
# this harness: 2.0-2.2e-4 fp16, 1.6e-3 bf16, the same as rounding the float64 result), where the register loop,
# which rounds every weight (q - z) s to 16 bits first, doubles it (3.9-4.4e-4, 3.1e-3).
ROUNDING_SLACK = 1.25


def fractional_case(rng, M, K, N, group, dtype):
    """An int4_linear case whose zero points are not integers (the layout allows any value of x's dtype)."""
    g = K // group
    x = torch.randn(M, K, generator=rng).to(dtype)
    q = torch.randint(0, 16, (N, K), generator=rng, dtype=torch.uint8)
    s = (torch.rand(N, g, generator=rng) * 0.05 + 0.01).to(dtype)
    z = (torch.rand(N, g, generator=rng) * 15).to(dtype)
    b = torch.randn(N, generator=rng).to(dtype)
    w = ((q.double().reshape(N, g, group) - z.double()[..., None]) * s.double()[..., None]).reshape(N, K)
    case = {"op": "int4_linear", "args": [x, pack_int4(q), s, z, b], "ints": [group]}
    return case, x.double() @ w.t() + b.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_post_scale_matches_float64(rng, dtype):
    # M = 1..8 (the transposed tile), groups 128 and 256, K = 17 x 128 (a partial last stage), split K on 1 and
    # 4 fake SMs; integer and fractional zero points
    cases, refs = [], []
    for M, K, N, g in [(1, 2176, 72, 128), (5, 4096, 264, 256), (8, 1024, 40, 128), (3, 1152, 100, 128)]:
        c, r = quant_case(rng, "int4_linear", M, K, N, dtype, group=g, bias=M % 2 == 1)
        cases.append(c)
        refs.append(r)
        c, r = fractional_case(rng, M, K, N, g, dtype)
        cases.append(c)
        refs.append(r)
    for sms in ("1", "4"):
        for case, ref, (y, trace) in zip(cases, refs, cuda_on_cpu.run_cases(cases, {**ON, "RK_CPU_SMS": sms})):
            assert any("Int4PostFrag" in line for line in trace), trace
            rounding = rel_err(ref.to(dtype), ref)
            assert torch.isfinite(y).all() and rel_err(y, ref) <= ROUNDING_SLACK * rounding, (rel_err(y, ref), rounding)


def test_post_scale_with_stream_k(rng):
    # with REPARAM_SMALL_M_STREAM_K=1 on 3 fake SMs: pieces of a column block start mid-K, at a stage boundary;
    # x prefetched a stage ahead too (the model reads each prefetched address: one past x would fault)
    cases, refs = [], []
    for M, K, N, g in [(1, 4096, 300, 128), (6, 2176, 264, 128)]:
        c, r = fractional_case(rng, M, K, N, g, torch.float16)
        cases.append(c)
        refs.append(r)
    env = {**ON, "REPARAM_SMALL_M_STREAM_K": "1", "RK_CPU_SMS": "3"}
    check(cases + cases, refs + refs, env=env, kernel="Int4PostFrag")
    check(cases, refs, env={**env, "REPARAM_SMALL_M_X_AHEAD": "1"}, kernel="Int4PostFrag")


def test_post_scale_only_where_it_applies(rng):
    # groups of 64 / 32 (a stage spans two groups), M > 8 and the transposed tile switched off keep Int4Frag
    cases, refs = [], []
    for M, K, N, g in [(1, 1024, 72, 64), (2, 544, 40, 32), (12, 1024, 72, 128)]:
        c, r = quant_case(rng, "int4_linear", M, K, N, torch.float16, group=g)
        cases.append(c)
        refs.append(r)
    traces = check(cases, refs, env={**ON, "REPARAM_SMALL_M_RING": "0"}, kernel="Int4Frag")
    assert not any("Int4PostFrag" in line for t in traces for line in t)
    c, r = quant_case(rng, "int4_linear", 1, 1024, 72, torch.float16, group=128)
    traces = check([c], [r], env={**ON, "REPARAM_SMALL_M_T": "0"}, kernel="Int4Frag")
    assert not any("Int4PostFrag" in line for t in traces for line in t)
    # and off by default
    traces = check([c], [r], kernel="Int4Frag")
    assert not any("Int4PostFrag" in line for t in traces for line in t)


POST_MUTATIONS = {
    # x's high-nibble slots not divided by 16 (the weights there are 1024 + 16 q)
    "x / 16": ("int4_format.cuh", "a[2] = small_m::Pair<T>::mul(a[2], 0x2C002C00u);  // 1/16", ""),
    # the magic's sum not taken off one output
    "offset": ("int4_format.cuh", "fmaf(-z0, o[2], d[0] - o[0])", "fmaf(-z0, o[2], d[0])"),
    # X summing the high slots as they reach the mma (x / 16) instead of x
    "X": ("int4_format.cuh", "o[3] = kHalf ? 0x4C004C00u : 0x3F803F80u;", "o[3] = 0x3C003C00u;"),
    # the two rows of an mma tile scaled by each other's scale and zero point
    "rows": ("small_m_gemm.cuh", "Frag::post(cur[2 * q], cur[2 * q + 1],", "Frag::post(cur[2 * q + 1], cur[2 * q],"),
    # the zero point's term taken with the other x row's sum
    "x row": ("int4_format.cuh", "fmaf(-z0, o[2], d[0] - o[0])", "fmaf(-z0, o[3], d[0] - o[0])"),
}


@pytest.mark.parametrize("name", list(POST_MUTATIONS))
def test_mutated_post_scale_is_caught(rng, name):
    c, r = fractional_case(rng, 3, 1152, 72, 128, torch.float16)
    env = {**ON, "RK_CPU_SMS": "1"}
    assert within(run_twice(c, env), r)
    assert not within(run_twice(c, env, POST_MUTATIONS[name]), r)
