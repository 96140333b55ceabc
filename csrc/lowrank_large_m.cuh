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
// Taken for M >= REPARAM_LOWRANK_CUBLAS_MIN_M (0 turns it off); by default every M for plain factors and
// M >= 2 for pivoted ones. Measured on the H200 (benchmarks/results/h200/lowrank_linear.json, r = 512):
// session 11's run had the fused kernels losing to these two products at every M >= 16 (8192^2 graph:
// 45.9 vs 13.2 us at M = 16, 69.3 vs 14.1 at 64, 78.2 vs 19.3 at 256; 28672 x 8192 likewise), tying at
// 2048, and M = 1 split (graph 15.2 vs 13.1 us, eager 29.2 vs 32.7); the 2026-12-04 run had them winning
// M = 1 too, graph and eager, on both shapes (8192^2: 13.0 vs 17.0 us graph, 18.2 vs 21.6 eager;
// 28672 x 8192: 18.2 vs 24.5, 24.1 vs 31.8), so plain factors take them at every M. Pivoted factors
// keep their fused launch at M = 1 (18.4 us there; two products plus the expansion below, predicted
// ~20 us, are not yet timed against it).
#pragma once

#include <algorithm>
#include <cstdlib>

#include "cublas_mm.cuh"

namespace reparam {
namespace lowrank_large_m {

inline int64_t min_m(bool pivoted) { return min_m_from_env("REPARAM_LOWRANK_CUBLAS_MIN_M", pivoted ? 2 : 1); }

// The pivoted right factor expanded to [r, K]: v[j, q] = [I | w][j, inv[q]], inv = perm^-1. Written
// column after column of each row (coalesced, 16-bit stores in order) after a K-thread pass inverts perm;
// w's row j is read in permuted order, from L1 / L2 (it is r * (K - r) values, read once from DRAM).
// The version the H200 timed (2026-12-04) scattered the stores instead (v[j, perm[c]] for consecutive c,
// a 64-bit division per element) and cost ~60 us at r = 512, K = 8192 (pivoted 75.2 vs plain 13.2 us at
// M = 16, graph); this one moves 2 r K bytes each way in order: predicted ~6 us there, not yet timed.
__global__ void invert_perm_kernel(const int64_t* __restrict__ perm, int32_t* __restrict__ inv, int64_t K) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < K; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = perm[c];
    if (q >= 0 && q < K) inv[q] = int32_t(c);  // (not a permutation breaks the op's contract, not memory)
  }
}

template <class T>
__global__ void expand_kernel(const T* __restrict__ w, const int32_t* __restrict__ inv, T* __restrict__ v,
                              int64_t K, int64_t r) {
  for (int64_t j = blockIdx.y; j < r; j += gridDim.y) {  // rows of v down the grid's y
    const T* wj = w + j * (K - r);
    T* vj = v + j * K;
    for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < K; q += int64_t(gridDim.x) * blockDim.x) {
      const int64_t c = inv[q];  // -1 where perm missed q: a zero column
      vj[q] = c < 0 ? from_f32<T>(0.0f) : c < r ? from_f32<T>(c == j ? 1.0f : 0.0f) : wj[c - r];
    }
  }
}

// Pivoted factors at small M: x's columns gathered instead of w expanded. t = x[:, perm[:r]] + xg @ w^T with
// xg = x[:, perm[r:]]: x is read once and xg written and read (~3 M K elements), where the expansion writes
// and reads v (2 r K) — so the gather pays while 3 M <= 2 r, i.e. at decode (r = 512, K = 8192, M = 16:
// ~0.8 MB against 16 MB), with one launch fewer (gather, GEMM, pivots' add, GEMM). REPARAM_PIVOTED_GATHER=0 /
// 1: never / always (bench_lowrank's peer cuda_expand); read per call. Untimed (session 40).
inline bool gather_pays(int64_t M, int64_t K, int64_t r) {
  if (K <= r) return false;  // (no columns to gather: the expansion handles w [r, 0])
  const char* v = std::getenv("REPARAM_PIVOTED_GATHER");
  if (v != nullptr && v[0] != '\0') return std::atoi(v) != 0;
  return 3 * M <= 2 * r;
}
// xg[m, c] = x[m, perm[r + c]], c < K - r (a q outside [0, K) reads as 0, as the expansion's zero column).
template <class T>
__global__ void gather_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm, T* __restrict__ xg,
                              int64_t M, int64_t K, int64_t r) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {  // rows down the grid's y
    const T* xm = x + m * K;
    T* gm = xg + m * (K - r);
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < K - r; c += int64_t(gridDim.x) * blockDim.x) {
      const int64_t q = perm[r + c];
      gm[c] = q >= 0 && q < K ? xm[q] : from_f32<T>(0.0f);
    }
  }
}
// t[m, j] += x[m, perm[j]], j < r: the identity block of [I | w], after t = xg @ w^T (the sum in fp32).
template <class T>
__global__ void add_pivots_kernel(T* __restrict__ t, const T* __restrict__ x, const int64_t* __restrict__ perm,
                                  int64_t M, int64_t K, int64_t r) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const T* xm = x + m * K;
    T* tm = t + m * r;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < r; j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t q = perm[j];
      tm[j] = from_f32<T>(to_f32<T>(tm[j]) + (q >= 0 && q < K ? to_f32<T>(xm[q]) : 0.0f));
    }
  }
}
// Blocks of 256 threads along a row of `cols` elements (<= 32) by rows (<= 65535) for the kernels above.
inline dim3 row_grid(int64_t cols, int64_t rows) {
  return dim3(unsigned(std::min<int64_t>((cols + 255) / 256, 32)), unsigned(std::min<int64_t>(rows, 65535)));
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
  } else if (gather_pays(M, K, r)) {
    const T* xp = static_cast<const T*>(xc.data_ptr());
    const int64_t* pp = static_cast<const int64_t*>(perm->data_ptr());
    Tensor xg = torch::stable::new_empty(xc, {M, K - r});
    gather_kernel<T><<<row_grid(K - r, M), 256, 0, stream>>>(xp, pp, static_cast<T*>(xg.data_ptr()), M, K, r);
    RK_CUDA_CHECK(cudaGetLastError());
    linear_out(xg, v, std::nullopt, t);
    add_pivots_kernel<T><<<row_grid(r, M), 256, 0, stream>>>(static_cast<T*>(t.data_ptr()), xp, pp, M, K, r);
    RK_CUDA_CHECK(cudaGetLastError());
  } else {  // expand w to the plain right factor (r * K writes: far less than a pass over x at large M)
    Tensor inv = torch::stable::new_empty(xc, {K}, ScalarType::Int);
    Tensor vf = torch::stable::new_empty(xc, {r, K});
    int32_t* invp = static_cast<int32_t*>(inv.data_ptr());
    STD_TORCH_CHECK(K < INT32_MAX, "reparam.pivoted_lowrank_linear: K must be below 2^31");
    RK_CUDA_CHECK(cudaMemsetAsync(invp, 0xFF, size_t(K) * sizeof(int32_t), stream));
    invert_perm_kernel<<<grid_stride_blocks(K, device), 256, 0, stream>>>(
        static_cast<const int64_t*>(perm->data_ptr()), invp, K);
    RK_CUDA_CHECK(cudaGetLastError());
    const unsigned cols = unsigned(std::min<int64_t>((K + 255) / 256, 32));  // <= 32 x 256 threads a row
    expand_kernel<T><<<dim3(cols, unsigned(std::min<int64_t>(r, 65535))), 256, 0, stream>>>(static_cast<const T*>(v.data_ptr()), invp,
                                                                 static_cast<T*>(vf.data_ptr()), K, r);
    RK_CUDA_CHECK(cudaGetLastError());
    linear_out(x2, vf, std::nullopt, t);
  }
  linear_out(t, u, bias, torch::stable::reshape(y, {M, N}));
}

}  // namespace lowrank_large_m
}  // namespace reparam
