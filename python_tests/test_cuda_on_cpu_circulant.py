"""The block-circulant / Toeplitz CUDA sources (csrc/block_circulant_linear.cu, block_circulant_large_m.cuh,
fft_smem.cuh) executed on the CPU through python_tests/cuda_on_cpu, against float64: the general kernel
(decode, staged spectrum and bias, row tiles that fill the GPU, several output blocks per CTA), the large-M
kernel at every block size, and mutations of both that must be caught. See test_cuda_on_cpu.py for the
harness and the other ops."""
import shutil

import pytest
import torch

import cuda_on_cpu
import test_structured_op as structured
from conftest import TOL, rel_err
from test_cuda_on_cpu import check

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


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
    # at b = 256: 16 + 1), every dtype (b = 256 and 512 in fp16 / bf16: the tensor-core FFT, fft_mma.cuh)
    cases, refs = [], []
    for M, K, N, b, dtype in [(11, 4100, 2300, 256, torch.float16), (6, 2100, 1300, 256, torch.bfloat16),
                              (9, 1000, 4500, 64, torch.bfloat16),
                              (3, 1500, 1500, 128, torch.float32), (10, 700, 1100, 512, torch.float16),
                              (7, 1536, 1100, 512, torch.bfloat16),
                              (5, 1500, 2100, 1024, torch.bfloat16), (6, 2048, 4000, 2048, torch.float32),
                              (5, 4000, 4096, 4096, torch.float16)]:
        x, spec, cols, bias = structured.make(rng, (M,), K, N, b, dtype)
        cases.append({"op": "block_circulant_linear", "args": [x, spec, bias if M % 2 else None], "ints": [b, N]})
        refs.append(structured.exact(x, cols, N, bias if M % 2 else None))
    check(cases, refs, env={"REPARAM_BC_LARGE_M_MIN_M": "1", "RK_CPU_SMS": "8"}, kernel="bc_large_m")


BC_MUTATIONS = {
    # the next pass's load (and the final sums) overwrite the transforms other threads still read
    "missing barrier": ("block_circulant_large_m.cuh", "    __syncthreads();  // res is overwritten", "    // res is"),
    # the Nyquist bin split with the DC sign
    "nyquist sign": ("block_circulant_large_m.cuh", "(z0.x - z0.y)", "(z0.x + z0.y)"),
    # the conjugate partner of bin k taken at k instead of H - k
    "partner bin": ("block_circulant_large_m.cuh", "const int kc = k == 0 ? 0 : H - k;", "const int kc = k;"),
    # x's raw rows converted before their cp.async copies landed
    "raw x wait": ("fft_smem.cuh", "    cp_async_wait<0>();\n    if constexpr (kRaw) return;",
                   "    if constexpr (kRaw) return;"),
    # the last row tile's padding rows (M = 11: rows 11 of a 4-row tile) stored past the end of y
    "row tail": ("block_circulant_large_m.cuh", "        if (mm >= live) return;\n", ""),
    # the tensor-core FFT (fft_mma.cuh, b = 256 in fp16 / bf16): the twiddles between its stages skipped,
    # its output pairs stored real, real, imaginary, imaginary; the inverse's packing taking bin n's
    # own value for its conjugate partner's
    "mma twiddle": ("fft_mma.cuh", "const float2 v = cmul(make_float2(ar[nt][q], ai[nt][q]), tw_ab[nt][q]);",
                    "const float2 v = make_float2(ar[nt][q], ai[nt][q]);"),
    "mma output": ("fft_mma.cuh", "make_float4(d[0], d[2], d[1], d[3])", "make_float4(d[0], d[1], d[2], d[3])"),
    "mma packing": ("block_circulant_large_m.cuh", "make_float2(y[H - k].x, -y[H - k].y);",
                    "make_float2(y[k].x, -y[k].y);"),
}

# The shared-memory Stockham FFT (fft_smem.cuh): the general kernel's, and the large-M kernel's off b = 256.
FFT_MUTATIONS = {
    # the radix-16 DFT's W16^1 conjugated
    "dft twiddle": ("fft_smem.cuh", "case 1: w = make_float2(c1, -s1);", "case 1: w = make_float2(c1, s1);"),
    # the first pass reads its (swizzled) input as if it were plain
    "swizzle": ("fft_smem.cuh", "reads_swizzled(int ns) { return ns == 1 || ns == 16; }",
                "reads_swizzled(int ns) { return ns == 16; }"),
}


BC_STAGE_MUTATIONS = {
    # the staged spectrum read before its copies landed
    "no cp.async wait": ("block_circulant_linear.cu", "    cp_async_wait<0>();  // the staged spectrum", "    // the staged"),
    # the 8-byte alignment slack of odd CTAs' slices ignored
    "stage shift": ("block_circulant_linear.cu", "    wsrc = ws + shift / 4;", "    wsrc = ws;"),
    # the bias indexed as the staged copy but read from global memory (every CTA but the first wrong)
    "staged bias": ("block_circulant_linear.cu", "      bias_src = bs;\n", ""),
}


def assert_mutation_caught(rng, M, K, N, env, kernel, mutation, b=256):
    """An fp16 case passes unmutated, on `kernel` (trace text), and fails with `mutation`."""
    x, spec, cols, bias = structured.make(rng, (M,), K, N, b, torch.float16)
    c = {"op": "block_circulant_linear", "args": [x, spec, bias], "ints": [b, N]}
    r = structured.exact(x, cols, N, bias)

    def passes(results):
        return all(torch.isfinite(y).all() and rel_err(y, r) <= TOL[torch.float16] for y, _ in results)

    results = cuda_on_cpu.run_cases([c], env)
    assert kernel in results[0][1][0] and passes(results)
    try:
        caught = not passes(cuda_on_cpu.run_cases([c], env, mutations=[mutation]))
    except cuda_on_cpu.KernelError:  # a fault: an access past a tensor's end hits its guard page
        caught = True
    assert caught


@pytest.mark.parametrize("name", list(BC_STAGE_MUTATIONS))
def test_mutated_block_circulant_staging_is_caught(rng, name):
    # decode: one CTA per output block, its spectrum slice staged by cp.async; q = 3 at b = 256 puts
    # odd CTAs' slices 8 bytes off a 16-byte boundary
    assert_mutation_caught(rng, 3, 700, 1100, {"RK_CPU_SEED": "4"}, "BcArgs", BC_STAGE_MUTATIONS[name])


@pytest.mark.parametrize("name", list(FFT_MUTATIONS))
def test_mutated_stockham_fft_is_caught(rng, name):
    # the general kernel at M = 11 (the large-M kernel at b = 256 transforms on tensor cores)
    assert_mutation_caught(rng, 11, 4104, 4400, {"REPARAM_BC_LARGE_M_MIN_M": "0", "RK_CPU_SEED": "2"}, "BcArgs",
                           FFT_MUTATIONS[name])


@pytest.mark.parametrize("name", list(BC_MUTATIONS))
def test_mutated_block_circulant_large_m_is_caught(rng, name):
    # two passes over the input blocks (K = 4104, b = 256: 16 + 1; rows 16-byte aligned: raw copy), a row
    # tail, two output block groups (p = 18: 16 + 2)
    assert_mutation_caught(rng, 11, 4104, 4400, {"REPARAM_BC_LARGE_M_MIN_M": "1", "RK_CPU_SEED": "2"}, "bc_large_m",
                           BC_MUTATIONS[name])


def test_mutated_mma_fft_radix16_stage_is_caught(rng):
    # b = 512: the tensor-core FFT's 256 points as 16 x 16, its second stage a 32 x 32 product (8 mma); the
    # real output's sine term taken with the wrong sign
    assert_mutation_caught(rng, 7, 2048, 1600, {"REPARAM_BC_LARGE_M_MIN_M": "1", "RK_CPU_SEED": "3"}, "bc_large_m",
                           ("fft_mma.cuh", "P::mma(dr, b_nim, im0, im1);", "P::mma(dr, b_im, im0, im1);"), b=512)
