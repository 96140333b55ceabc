"""The CUDA ops' real sources (csrc/: host planning and kernels) executed on the CPU through
python_tests/cuda_on_cpu (fibers per CUDA thread, warp collectives and mma fragments from all 32
lanes, cp.async landing only at the wait, guard-paged tensors), against float64, on every path
each op can take; the launch trace says which path ran. Then mutations of the sources (a wrong
slot map, a missing barrier or wait, an off-by-one split counter, a missing bounds check, a
divergent barrier; for wgmma a missing wait, swapped descriptor strides, an unguarded buffer
refill, an off-by-one split counter, x in the wrong slot order) must each be caught — the
harness can fail."""
import shutil

import pytest
import torch

import cuda_on_cpu
import test_lowrank_op as plain
import test_pivoted_lowrank as piv
import test_quant_ops as quant
import test_structured_op as structured
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
    case launched a kernel whose trace line contains that text. Returns the traces."""
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
    # register-fed mma.sync path (csrc/small_m_gemm.cuh): M <= 64, all three tile shapes, split K
    cases, refs = [], []
    for op in QUANT:
        for M, K, N, g in [(1, 544, 72, 32), (5, 1056, 100, 32), (16, 512, 264, 64), (17, 256, 40, 128),
                           (33, 128, 72, 32), (64, 160, 24, 32)]:
            c, r = quant_case(rng, op, M, K, N, dtype, group=g, bias=M % 2 == 1)
            cases.append(c)
            refs.append(r)
    check(cases, refs, kernel="small_m::Problem")


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


def test_quant_dequantize_then_gemm_path(rng):
    # M >= REPARAM_DEQUANT_MIN_M: dequantize_kernel, then aten::linear.out (a reference GEMM here)
    cases, refs = [], []
    for op in QUANT:
        c, r = quant_case(rng, op, 70, 96, 36, torch.bfloat16)
        cases.append(c)
        refs.append(r)
    check(cases, refs, env={"REPARAM_DEQUANT_MIN_M": "65"}, kernel="dequantize_kernel")


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
    check(cases, refs, env={"REPARAM_WGMMA_BN": bn}, kernel="wgmma_kernel<")
    check(cases[:3], refs[:3], env={"REPARAM_WGMMA_BN": bn, "RK_CPU_CP_ASYNC_EARLY": "1"},
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
        for t in check(cases[:3], refs[:3], env=env):
            assert not any("wgmma_kernel" in line for line in t) and any("mma_kernel" in line for line in t)
    for c in cases[:3]:
        c["offsets"] = {0: 2}  # x 2 bytes off 16-byte alignment: the WMMA tiles instead
    for t in check(cases[:3], refs[:3]):
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
    cases, refs = lowrank_cases(rng, [(1, 136, 200, 24), (17, 1000, 72, 64), (64, 48, 40, 40)], dtype)
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


# ------------------------------------------------------------------ block-circulant / Toeplitz

def test_block_circulant_and_toeplitz(rng):
    cases, refs = [], []
    for M, K, N, b, dtype in [(1, 1024, 1024, 256, torch.float16), (3, 1000, 700, 64, torch.bfloat16),
                              (17, 300, 500, 128, torch.float32), (300, 520, 1024, 64, torch.float16)]:
        x, spec, cols, bias = structured.make(rng, (M,), K, N, b, dtype)
        cases.append({"op": "block_circulant_linear", "args": [x, spec, bias], "ints": [b, N]})
        refs.append(structured.exact(x, cols, N, bias))
    # Toeplitz = one circulant block of fft_size >= out + in - 1 points: its spectrum from the layer
    from reparam_kernels.nn import ToeplitzLinear
    layer = ToeplitzLinear.from_linear(torch.nn.Linear(100, 90))
    assert layer.fft_size == 256  # a size the CUDA kernel takes (a power of two in 64..4096)
    x = torch.randn(5, 100, generator=rng)
    bias = layer.bias.detach()
    cases.append({"op": "toeplitz_linear", "args": [x, layer.t_spectrum.detach(), bias], "ints": [256, 90]})
    refs.append(x.double() @ layer.to_dense().double().t() + bias.double())
    # the general kernel at every M (the 300-row case: 8 output blocks per CTA), not the large-M one
    check(cases, refs, env={"RK_CPU_SMS": "8", "REPARAM_BC_LARGE_M_MIN_M": "0"})


@pytest.mark.parametrize("sms,M", [(132, 16), (132, 7), (40, 38)])
def test_block_circulant_rows_per_cta_shrink_to_fill_the_gpu(rng, sms, M):
    # few rows, many SMs: the general kernel's row tile halves until the grid fills them (1 row a CTA
    # at M = 16 or 7 on 132 SMs; 4 rows with a 2-row tail at M = 38 on 40 SMs)
    x, spec, cols, bias = structured.make(rng, (M,), 1000, 1024, 256, torch.float16)
    c = {"op": "block_circulant_linear", "args": [x, spec, bias], "ints": [256, 1024]}
    traces = check([c], [structured.exact(x, cols, 1024, bias)], env={"RK_CPU_SMS": str(sms)})
    tiles = M if sms == 132 else 10
    assert f"grid ({tiles},4,1)" in traces[0][0], traces


def test_block_circulant_large_m_path(rng):
    # csrc/block_circulant_large_m.cuh forced at small M: every block size (its four register layouts),
    # row tails (M not a multiple of TM), N and K not multiples of b, output block groups cut short
    # by p (and p = 71 > 64 at b = 64: two groups), several passes over the input blocks (K = 4100
    # at b = 256: 16 + 1), every dtype
    cases, refs = [], []
    for M, K, N, b, dtype in [(11, 4100, 2300, 256, torch.float16), (9, 1000, 4500, 64, torch.bfloat16),
                              (3, 1500, 1500, 128, torch.float32), (10, 700, 1100, 512, torch.float16),
                              (5, 1500, 2100, 1024, torch.bfloat16), (6, 2048, 4000, 2048, torch.float32),
                              (5, 4000, 4096, 4096, torch.float16)]:
        x, spec, cols, bias = structured.make(rng, (M,), K, N, b, dtype)
        cases.append({"op": "block_circulant_linear", "args": [x, spec, bias if M % 2 else None], "ints": [b, N]})
        refs.append(structured.exact(x, cols, N, bias if M % 2 else None))
    check(cases, refs, env={"REPARAM_BC_LARGE_M_MIN_M": "1", "RK_CPU_SMS": "8"}, kernel="bc_large_m")


# ------------------------------------------------------------------ the harness catches bugs

MUTATIONS = {
    # int4's A operand built with the wrong byte permute: x no longer follows the weights' slot map
    "slot map": ("int4_linear.cu", "a[0] = __byte_perm(word(r0, h), word(r0, h + 2), 0x5410);",
                 "a[0] = __byte_perm(word(r0, h), word(r0, h + 2), 0x5432);"),
    # the K-warp partials read before the other warps wrote them
    "missing barrier": ("small_m_gemm.cuh", "  __syncthreads();\n  if (wk == 0) {", "  if (wk == 0) {"),
    # the split-K arrival counter's limit off by one: no CTA sees itself as last
    "split counter": ("split_k_counters.h", "atomicInc(counter, unsigned(splits - 1))",
                      "atomicInc(counter, unsigned(splits))"),
    # weight rows past N loaded: reads run off the end of qweight
    "bounds check": ("small_m_gemm.cuh", "c[j] = (n < N && kt < ke) ? frag.load(n, kt) : Frag::zero();",
                     "c[j] = (kt < ke) ? frag.load(n, kt) : Frag::zero();"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_small_m_path_is_caught(rng, name):
    # the same op twice in one process: a counter left non-zero shows on the second launch
    c, r = quant_case(rng, "int4_linear", 3, 2048, 40, torch.float16, group=128)
    env = {"RK_CPU_SEED": "3"}

    def passes(results):
        return all(torch.isfinite(y).all() and rel_err(y, r) <= TOL[torch.float16] for y, _ in results)

    assert passes(cuda_on_cpu.run_cases([c, c], env))  # unmutated
    try:
        results = cuda_on_cpu.run_cases([c, c], env, mutations=[MUTATIONS[name]])
    except cuda_on_cpu.KernelError as e:  # a fault (the bounds check) ends the process with a report
        assert "outside every tensor" in str(e)
        return
    assert not passes(results)


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
}


@pytest.mark.parametrize("name", list(WGMMA_MUTATIONS))
def test_mutated_wgmma_path_is_caught(rng, name):
    # 16 stages split 2 ways over the fake GPU's 4 SMs (2 tiles): buffers reused, split-K fixups; twice
    c, r = quant_case(rng, "int4_linear", 100, 2048, 130, torch.float16, group=128)
    env = {"RK_CPU_SEED": "5", "RK_CPU_CP_ASYNC_EARLY": "1"}

    def passes(results):
        return all(torch.isfinite(y).all() and rel_err(y, r) <= TOL[torch.float16] for y, _ in results)

    results = cuda_on_cpu.run_cases([c, c], env)
    assert "wgmma_kernel" in results[0][1][1] and "grid (1,2,2)" in results[0][1][1] and passes(results)
    assert not passes(cuda_on_cpu.run_cases([c, c], env, mutations=[WGMMA_MUTATIONS[name]]))


def test_missing_cp_async_wait_is_caught(rng):
    # the WMMA tiles read a shared-memory stage before its copies landed
    cases, refs = lowrank_cases(rng, [(40, 256, 72, 32)], torch.float16)
    mutation = ("gemm_nt_tile.cuh", "      cp_async_wait<1>();\n", "")
    check(cases, refs, env={"REPARAM_SMALL_M": "0"})
    y, _ = cuda_on_cpu.run_cases(cases[:1], {"REPARAM_SMALL_M": "0"}, mutations=[mutation])[0]
    assert not (torch.isfinite(y).all() and rel_err(y, refs[0]) <= TOL[torch.float16])


def test_divergent_barrier_is_caught(rng):
    c, _ = quant_case(rng, "int8_linear", 3, 512, 40, torch.float16)
    mutation = ("split_k_counters.h", "  __syncthreads();  // (also:", "  if (threadIdx.x % 64 != 5) __syncthreads();  // (")
    with pytest.raises(cuda_on_cpu.KernelError, match="divergent|deadlock"):
        cuda_on_cpu.run_cases([c], mutations=[mutation])


BC_MUTATIONS = {
    # the next pass's load (and the final sums) overwrite the transforms other threads still read
    "missing barrier": ("block_circulant_large_m.cuh", "    __syncthreads();  // res is overwritten", "    // res is"),
    # the Nyquist bin split with the DC sign
    "nyquist sign": ("block_circulant_large_m.cuh", "(z0.x - z0.y)", "(z0.x + z0.y)"),
    # the conjugate partner of bin k taken at k instead of H - k
    "partner bin": ("block_circulant_large_m.cuh", "const int kc = k == 0 ? 0 : H - k;", "const int kc = k;"),
    # the radix-16 DFT's W16^1 conjugated (fft_smem.cuh, shared by both kernels)
    "dft twiddle": ("fft_smem.cuh", "case 1: w = make_float2(c1, -s1);", "case 1: w = make_float2(c1, s1);"),
    # x's raw rows converted before their cp.async copies landed
    "raw x wait": ("fft_smem.cuh", "    while_copying();\n    cp_async_wait<0>();\n    __syncthreads();\n    const T* rv",
                   "    while_copying();\n    __syncthreads();\n    const T* rv"),
    # the first pass reads its (swizzled) input as if it were plain
    "swizzle": ("fft_smem.cuh", "const bool swz_in = ns == 1 || ns == 16,", "const bool swz_in = ns == 16,"),
}


BC_STAGE_MUTATIONS = {
    # the staged spectrum read before its copies landed
    "no cp.async wait": ("block_circulant_linear.cu", "    cp_async_wait<0>();  // the staged spectrum", "    // the staged"),
    # the 8-byte alignment slack of odd CTAs' slices ignored
    "stage shift": ("block_circulant_linear.cu", "    wsrc = ws + shift / 4;", "    wsrc = ws;"),
    # the bias indexed as the staged copy but read from global memory (every CTA but the first wrong)
    "staged bias": ("block_circulant_linear.cu", "      bias_src = reinterpret_cast<const T*>(bs);\n", ""),
}


@pytest.mark.parametrize("name", list(BC_STAGE_MUTATIONS))
def test_mutated_block_circulant_staging_is_caught(rng, name):
    # decode: one CTA per output block, its spectrum slice staged by cp.async; q = 3 at b = 256 puts
    # odd CTAs' slices 8 bytes off a 16-byte boundary
    x, spec, cols, bias = structured.make(rng, (3,), 700, 1100, 256, torch.float16)
    c = {"op": "block_circulant_linear", "args": [x, spec, bias], "ints": [256, 1100]}
    r = structured.exact(x, cols, 1100, bias)

    def passes(results):
        return all(torch.isfinite(y).all() and rel_err(y, r) <= TOL[torch.float16] for y, _ in results)

    results = cuda_on_cpu.run_cases([c], {"RK_CPU_SEED": "4"})
    assert "BcArgs" in results[0][1][0] and passes(results)
    assert not passes(cuda_on_cpu.run_cases([c], {"RK_CPU_SEED": "4"}, mutations=[BC_STAGE_MUTATIONS[name]]))


@pytest.mark.parametrize("name", list(BC_MUTATIONS))
def test_mutated_block_circulant_large_m_is_caught(rng, name):
    # two passes over the input blocks (K = 4104, b = 256: 16 + 1), a row tail, two output block
    # groups (p = 18: 16 + 2)
    x, spec, cols, bias = structured.make(rng, (11,), 4104, 4400, 256, torch.float16)  # rows 16-byte aligned: raw copy
    c = {"op": "block_circulant_linear", "args": [x, spec, bias], "ints": [256, 4400]}
    r = structured.exact(x, cols, 4400, bias)
    env = {"REPARAM_BC_LARGE_M_MIN_M": "1", "RK_CPU_SEED": "2"}

    def passes(results):
        return all(torch.isfinite(y).all() and rel_err(y, r) <= TOL[torch.float16] for y, _ in results)

    results = cuda_on_cpu.run_cases([c], env)
    assert "bc_large_m" in results[0][1][0] and passes(results)
    assert not passes(cuda_on_cpu.run_cases([c], env, mutations=[BC_MUTATIONS[name]]))
