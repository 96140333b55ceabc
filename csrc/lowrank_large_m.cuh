// Large-M route of the low-rank ops (lowrank_linear, pivoted_lowrank_linear):
// two cuBLAS products, t = x @ v^T then y = t @ u^T + bias (aten::linear.out, the
// bias in the GEMM's epilogue), with t [M, r] in
// global memory. At prefill sizes both products are compute-bound and t is
// small beside them (M * r vs M * K), while the fused kernel's WMMA tiles
// (mma.sync, two stages, no wgmma) run well below cuBLAS's Hopper kernels; the
// fused launch keeps the small-M cases, where one launch instead of two is
// the point. Pivoted factors (w [r, K - r], perm [K]) are first expanded to the
// plain right factor [I | w] P [r, K] by one small kernel (r * K writes).
//
// Taken for M >= REPARAM_LOWRANK_CUBLAS_MIN_M (default 2; 0 turns it off). Measured on the H200
// (benchmarks/results/h200/lowrank_linear.json, r = 512, CUDA graph): the fused kernels lose to these
// two products at every M >= 16 (8192^2: 45.9 vs 13.2 us at M = 16, 69.3 vs 14.1 at 64, 78.2 vs 19.3 at
// 256; 28672 x 8192 likewise) and tie at 2048; only M = 1 stays fused (graph 15.2 vs 13.1 us, but eager
// 29.2 vs 32.7: one launch instead of two and no [M, r] temporary).
#pragma once

#include "cublas_mm.cuh"

namespace reparam {
namespace lowrank_large_m {

inline int64_t min_m() { return min_m_from_env("REPARAM_LOWRANK_CUBLAS_MIN_M", 2); }

// v[j, perm[c]] = [I | w][j, c]: the pivoted right factor expanded to [r, K] (each entry written once:
// perm is a permutation).
template <class T>
__global__ void expand_kernel(const T* __restrict__ w, const int64_t* __restrict__ perm, T* __restrict__ v,
                              int64_t K, int64_t r) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < r * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i / K, c = i % K;
    const float value = c < r ? (c == j ? 1.f : 0.f) : to_f32<T>(w[j * (K - r) + (c - r)]);
    v[j * K + perm[c]] = from_f32<T>(value);
  }
}

// y [.., N] = x [.., K] @ W^T + bias; v is [r, K], or w [r, K - r] with perm [K] when pivoted.
template <class T>
void run(const Tensor& xc, const Tensor& u, const Tensor& v, const Tensor* perm, const std::optional<Tensor>& bias,
         const Tensor& y, int64_t M, int64_t N, int64_t K, int64_t r, cudaStream_t stream) {
  const int device = xc.get_device_index();
  Tensor t = torch::stable::new_empty(xc, {M, r});
  Tensor x2 = torch::stable::reshape(xc, {M, K});
  if (perm == nullptr) {
    linear_out(x2, v, std::nullopt, t);
  } else {  // expand w to the plain right factor (r * K writes: far less than a pass over x at large M)
    Tensor vf = torch::stable::new_empty(xc, {r, K});
    expand_kernel<T><<<grid_stride_blocks(r * K, device), 256, 0, stream>>>(static_cast<const T*>(v.data_ptr()),
                                                                   static_cast<const int64_t*>(perm->data_ptr()),
                                                                   static_cast<T*>(vf.data_ptr()), K, r);
    RK_CUDA_CHECK(cudaGetLastError());
    linear_out(x2, vf, std::nullopt, t);
  }
  linear_out(t, u, bias, torch::stable::reshape(y, {M, N}));
}

}  // namespace lowrank_large_m
}  // namespace reparam
