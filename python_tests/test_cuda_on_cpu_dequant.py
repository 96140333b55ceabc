"""The quantized ops' large-M path (csrc/quant_dequant_mm.cuh: dequantize W, then aten::linear.out, a
reference GEMM here) run on the CPU through python_tests/cuda_on_cpu, as test_cuda_on_cpu.py does for the
other paths: the whole weight at once and a piece of rows at a time within a scratch budget, against float64;
the C++ plan of the pieces against its Python mirror; mutations that must be caught."""
import shutil

import pytest
import torch

from reparam_kernels.cli.env import dequant_pieces
from test_cuda_on_cpu import QUANT, check, quant_case, run_twice, within

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def test_quant_dequantize_then_gemm_path(rng):
    # M >= REPARAM_DEQUANT_MIN_M: dequantize_kernel, then aten::linear.out (a reference GEMM here)
    # a CTA a row at a time, a thread 8 weights at a time (4 units of 8 in flight): rows of 12 units (most
    # threads idle), a group that is not a power of two, K not a multiple of 8 (scalar stores), and with
    # one SM (16 CTAs) 40 rows of 1025 units (the row loop three times, the unit loop twice)
    cases, refs = [], []
    for op in QUANT:
        c, r = quant_case(rng, op, 70, 96, 36, torch.bfloat16)
        cases.append(c)
        refs.append(r)
    for op, K, N, g in [("int4_linear", 192, 23, 96), ("int8_linear", 100, 19, 32), ("lut_linear", 36, 16, 32),
                        ("int8_linear", 8200, 40, 32)]:
        c, r = quant_case(rng, op, 66, K, N, torch.float16, group=g)
        cases.append(c)
        refs.append(r)
    check(cases, refs, env={"REPARAM_DEQUANT_MIN_M": "65", "RK_CPU_SMS": "1"}, kernel="dequantize_kernel")


# dequantize + cuBLAS from M = 65, one fake SM, a 10 KB scratch budget: pieces of 128 rows
PIECES_ENV = {"REPARAM_DEQUANT_MIN_M": "65", "RK_CPU_SMS": "1", "REPARAM_DEQUANT_SCRATCH_MB": "0.01"}


def test_quant_dequantize_in_pieces(rng):
    # A scratch budget smaller than the weight (REPARAM_DEQUANT_SCRATCH_MB): rows of W go a piece at a time
    # into one reused buffer, each piece's GEMM writing its columns of y through a strided view (the bias
    # narrowed with it). One SM: pieces of 128 rows; N = 300 makes 3 pieces, the last of 44 rows; N = 256 two
    # whole ones. Without the budget the same call dequantizes in one launch.
    # (vq_linear's pieces: test_cuda_on_cpu_vq.py)
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, bias in [(66, 96, 300, True), (70, 64, 256, False)]:
            c, r = quant_case(rng, op, M, K, N, torch.float16 if N == 300 else torch.bfloat16, bias=bias)
            cases.append(c)
            refs.append(r)
    traces = check(cases, refs, env=PIECES_ENV, kernel="dequantize_kernel")
    for case, ref, t in zip(cases, refs, traces):
        (M, K), N = case["args"][0].shape, ref.shape[-1]
        pieces = sum("dequantize_kernel" in line for line in t)
        assert pieces == (3 if N == 300 else 2), (case["op"], t)
        # the Python mirror that the benchmarks and `env` use agrees with the C++ plan
        assert dequant_pieces(M, N, K, 2, 1, 0.01 * 2**20) == (128, pieces)
    one_piece = {**PIECES_ENV, "REPARAM_DEQUANT_SCRATCH_MB": "0"}
    whole = check(cases[:2], refs[:2], env=one_piece, kernel="dequantize_kernel")
    assert all(sum("dequantize_kernel" in line for line in t) == 1 for t in whole)


def test_dequantize_pieces_follow_the_python_mirror(rng):
    # the C++ plan (dequant_chunk_rows) against reparam_kernels.cli.env.dequant_pieces on fake GPUs of 1, 3 and 4
    # SMs, M over one and two 128-row tiles, budgets of one and several pieces' rows: the same number of
    # dequantize launches, and the results right
    cases, refs, plans = [], [], []
    for M, K, N, sms, mb in [(66, 64, 520, 3, 0.01), (130, 64, 520, 3, 0.01), (130, 96, 700, 4, 0.05),
                             (66, 128, 400, 1, 1.0), (70, 64, 1100, 1, 0.04)]:
        c, r = quant_case(rng, "int8_linear", M, K, N, torch.float16, bias=N % 2 == 0)
        c["env"] = {"RK_CPU_SMS": str(sms), "REPARAM_DEQUANT_SCRATCH_MB": str(mb)}
        cases.append(c)
        refs.append(r)
        plans.append(dequant_pieces(M, N, K, 2, sms, mb * 2**20)[1])
    assert len(set(plans)) > 2, plans  # the cases span several plans
    for c, r, pieces in zip(cases, refs, plans):
        env = {"REPARAM_DEQUANT_MIN_M": "65", **c.pop("env")}
        (t,) = check([c], [r], env=env, kernel="dequantize_kernel")
        assert sum("dequantize_kernel" in line for line in t) == pieces, (env, t)


def test_quant_dequantize_in_pieces_mutations_are_caught(rng):
    # each piece's rows of W, its columns of y and its slice of the bias must line up: a piece dequantizing
    # from row 0, writing y's first columns, or adding the bias's first entries computes wrong
    c, ref = quant_case(rng, "int4_linear", 66, 96, 300, torch.float16)
    assert within(run_twice(c, PIECES_ENV), ref)
    for mutation in [("quant_dequant_mm.cuh", "const int64_t n = n0 + r;", "const int64_t n = r;"),
                     ("quant_dequant_mm.cuh", "torch::stable::narrow(y2, 1, n0, r)",
                      "torch::stable::narrow(y2, 1, 0, r)"),
                     ("quant_dequant_mm.cuh", "b = torch::stable::narrow(bb, 0, n0, r);",
                      "b = torch::stable::narrow(bb, 0, 0, r);")]:
        assert not within(run_twice(c, PIECES_ENV, mutation), ref), mutation
