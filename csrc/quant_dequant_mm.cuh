// Large-M path of the quantized ops: dequantize W once into x's dtype (one
// bandwidth-bound pass: read the packed weight, write N x K halves), then
// cuBLAS through aten::linear.out straight into y (the bias in its epilogue).
//
// Why: at large M the GEMM is compute-bound and the extra pass is small beside
// it (8192 x 8192 at M = 2048: ~45 us of dequantization vs ~400 us of GEMM at
// cuBLAS's 680 TFLOP/s, i.e. ~0.9x of cuBLAS on the dense weight), while
// quant_gemm.cuh's WMMA tiles (mma.sync, 2 stages, no wgmma) would run at a
// fraction of cuBLAS's Hopper kernels. The cost is a temporary N x K buffer
// (128 MB for 8192 x 8192 fp16) from the caching allocator.
//
// Taken for M >= REPARAM_DEQUANT_MIN_M (default 256; 0 turns it off). From the first H200 run
// (benchmarks/results/h200/*_linear.json, CUDA graph, 8192 x 8192): at M = 2048 this path costs cuBLAS
// plus 96 / 61 / 119 us (int4 / int8 / lut: the dequantization pass), and at M = 256 cuBLAS takes 57 us
// while the wgmma path took 190-193 us, so this path's predicted 153 / 118 / 177 us wins there; at M = 64
// (cuBLAS 37 us) the small-M path's 90 / 69 / 86 us beats its 133 / 98 / 156. The crossover between 64 and
// 256 is not measured yet (bench_quant's peers cuda_dequant_cublas / cuda_wgmma time both sides).
#pragma once

#include "cublas_mm.cuh"
#include "quant_gemm.cuh"

namespace reparam {
namespace quant {

inline int64_t dequant_min_m() { return min_m_from_env("REPARAM_DEQUANT_MIN_M", 256); }

// W[n, k] in T for every n < N, k < K, one 16-byte chunk of packed weights per iteration.
template <class Dec, class T>
__global__ void __launch_bounds__(256) dequantize_kernel(Dec dec, T* __restrict__ w, int64_t N, int64_t K) {
  constexpr int KC = Dec::KC;
  const int64_t chunks = (K + KC - 1) / KC;
  const bool vec = K % 8 == 0;  // rows then start 16-byte aligned (the buffer is fresh)
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < N * chunks;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = c / chunks, k0 = (c % chunks) * KC;
    const uint4 raw = dec.load(n, k0);
    const typename Dec::Params prm = dec.params(n, k0);
    T* row = w + n * K;
#pragma unroll
    for (int j = 0; j < KC / 8; ++j) {
      const int64_t k = k0 + 8 * j;
      if (k >= K) break;
      float v[8];
      dec.decode8(raw, prm, j, v);
      if (vec) {  // K % 8 == 0: all 8 are inside the row
        Vec8<T> out;
        T* p = reinterpret_cast<T*>(&out.raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) p[e] = from_f32<T>(v[e]);
        *reinterpret_cast<uint4*>(row + k) = out.raw;
      } else {
        for (int e = 0; e < 8 && k + e < K; ++e) row[k + e] = from_f32<T>(v[e]);
      }
    }
  }
}

// y[..., N] = x[..., K] @ W^T + bias with W decoded by `dec`; xc contiguous, y fresh and contiguous.
template <class Dec, class T>
void dequant_matmul(const Dec& dec, const Tensor& xc, const std::optional<Tensor>& bias, const Tensor& y, int64_t M,
                    int64_t N, int64_t K, cudaStream_t stream) {
  Tensor w = torch::stable::new_empty(xc, {N, K});
  const unsigned blocks = grid_stride_blocks(N * ((K + Dec::KC - 1) / Dec::KC), xc.get_device_index());
  dequantize_kernel<Dec, T><<<blocks, 256, 0, stream>>>(dec, static_cast<T*>(w.data_ptr()), N, K);
  RK_CUDA_CHECK(cudaGetLastError());
  linear_out(torch::stable::reshape(xc, {M, K}), w, bias, torch::stable::reshape(y, {M, N}));
}

// The general path for any M (what the ops run when the small-M path does not apply):
// dequantize + cuBLAS from dequant_min_m() on, quant_gemm.cuh's GEMV / WMMA tiles below.
template <class Dec, class T>
void general_linear(const Dec& dec, const Tensor& xc, const std::optional<Tensor>& bias, const Tensor& y, int64_t M,
                    int64_t N, int64_t K, cudaStream_t stream) {
  if (M >= dequant_min_m()) return dequant_matmul<Dec, T>(dec, xc, bias, y, M, N, K, stream);
  quant_linear(dec, static_cast<const T*>(xc.data_ptr()),
               bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()),
               M, N, K, xc, stream);
}

}  // namespace quant
}  // namespace reparam
