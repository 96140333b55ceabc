// Decode of low-rank factors as two GEMVs in one cooperative launch (lowrank_linear, pivoted_lowrank_linear; 1 <= M <= 8;
// REPARAM_LOWRANK_GEMV=1, off until timed). Why: at M = 1 the H200 measured 13.0 us for the two cuBLAS
// GEMVs of 8192^2, r = 512 (16.8 MB: 1.3 TB/s) and 17.0 us for the tensor-core fused launch
// (lowrank_small_m.cuh: each phase a split-K tile loop one register stage ahead with a last-CTA fixup, then a
// grid barrier); issue 2 asks for <= 6 us there. At M <= 8 the products are a few FMAs per weight byte, so
// what counts is how many of the 16.8 MB are requested at once and how many dependent round trips follow:
//   - phase 2's factor does not depend on t: every CTA copies its rows of u into shared memory with
//     cp.async at the start (as many as fit, the rest prefetched into L2), so u streams in under phase 1;
//   - phase 1 (t = x @ v^T) is one warp per (row of v, K split), each lane 8 16-byte loads of v issued
//     before any is used (requested ahead of u's copies); the warp's sum goes to its split's slot of an
//     fp32 workspace [S, M, r] by one store: no fixup, no atomics, no zeroing;
//   - one grid barrier; each CTA sums the S slots of t into shared memory (fp32) and runs its rows of u
//     from shared memory, a warp per row, bias and y's rounding at the end.
// Everything in fp32; t is never rounded to x's dtype (the two cuBLAS products round it once).
// Pivoted factors (pivoted_lowrank_linear: v is w [r, K - r] of W = u [I | w] P): a CTA's warps share a K split,
// whose columns of x (perm[r + k]) the CTA gathers into shared memory once; t's identity block (x's columns
// perm[j]) is added before the barrier. No expansion of w, no gather pass of its own.
// Requirements (else the caller takes another path): K (pivoted: K - r) and r multiples of 8, v, u (plain: x)
// 16-byte aligned, sm_80+, t's fp32 copy (M r floats) within the shared-memory budget.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>
#include <cooperative_groups.h>

#include "common.cuh"

namespace reparam {
namespace lowrank_gemv {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kMaxM = 8;
constexpr int kLaneK = 8;                 // elements of one 16-byte load
constexpr int kWarpK = 32 * kLaneK;       // 256 elements: a warp's one load each
constexpr int batch_for(int M) { return M <= 2 ? 8 : 4; }  // loads a lane holds in flight in phase 1

template <class T>
struct Args {
  const T* x;             // [M, K]
  const T* v;             // [r, K1]: v (plain, K1 = K) or w of [I | w] P (pivoted, K1 = K - r)
  const int64_t* perm;    // [K] (pivoted) or nullptr
  const T* u;             // [N, r]
  const T* bias;          // [N] or nullptr
  T* y;                   // [M, N]
  float* tp;              // [S, M, r]: phase 1's split sums
  int64_t N, K, K1, r;
  int64_t ks;             // phase 1's K split (a multiple of kWarpK)
  int S;                  // K splits: ceil(K1 / ks)
  int64_t rows;           // rows of u a CTA owns in phase 2
  int64_t staged;         // of which the first `staged` are copied to shared memory
};

// 8 fp16 / bf16 of a 16-byte load, as fp32, dotted with 8 fp32.
template <class T>
__device__ __forceinline__ float dot8(const uint4& w, const float* f) {
  const T* e = reinterpret_cast<const T*>(&w);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(to_f32<T>(e[i]), f[i], s);
  return s;
}
template <class T>
__device__ __forceinline__ void to_f32x8(const uint4& w, float* f) {
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f32<T>(e[i]);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The CTA's rows [n0, n0 + staged) of u into shared memory (cp.async, one group), the rest of its rows'
// lines into L2. Only addresses inside u are passed.
template <class T>
__device__ __forceinline__ void stage_u(const Args<T>& a, T* us, int64_t n0, int64_t n_end) {
  const int64_t chunks_row = a.r / kLaneK, staged = min(a.staged, max(n_end - n0, int64_t(0)));
  for (int64_t c = threadIdx.x; c < staged * chunks_row; c += kThreads)
    cp_async16(us + c * kLaneK, a.u + n0 * a.r + c * kLaneK, 16);
  cp_async_commit();
  const int64_t lines_row = (a.r * int64_t(sizeof(T)) + 127) / 128;
  for (int64_t e = threadIdx.x; e < (n_end - n0 - staged) * lines_row; e += kThreads) {
    const int64_t n = n0 + staged + e / lines_row, j = e % lines_row;
    prefetch_l2(reinterpret_cast<const unsigned char*>(a.u + n * a.r) + min(128 * j, a.r * int64_t(sizeof(T)) - 16));
  }
}

// x's columns perm[r + kb .. r + ke) of every row, gathered into shared memory [M, ks] for the split [kb, ke) of
// pivoted factors (a column outside [0, K) reads as 0, as the other paths' zero column).
template <class T, int M>
__device__ __forceinline__ void gather_split(const Args<T>& a, T* xg, int64_t kb, int64_t ke) {
  const int64_t n = ke - kb;
  for (int64_t e = threadIdx.x; e < n * M; e += kThreads) {
    const int64_t m = e / n, c = e % n;
    const int64_t q = a.perm[a.r + kb + c];
    xg[m * a.ks + c] = q >= 0 && q < a.K ? a.x[m * a.K + q] : from_f32<T>(0.0f);
  }
}

// kPivoted: v is w [r, K - r] of W = u [I | w] P, x's non-pivot columns gathered per split into shared memory and
// its pivot columns added to t (the identity block) before the barrier.
template <class T, int M, bool kPivoted>
__global__ void __launch_bounds__(kThreads, 2) lowrank_gemv_kernel(Args<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async needs sm_80; the host never launches this below sm_80
#else
  constexpr int B = batch_for(M);
  extern __shared__ __align__(16) uint4 gemv_smem[];
  T* us = reinterpret_cast<T*>(gemv_smem);                    // [staged, r]
  float* ts = reinterpret_cast<float*>(us + a.staged * a.r);  // [M, r]
  T* xg = reinterpret_cast<T*>(ts + M * a.r);                 // [M, ks] (pivoted)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = int64_t(blockIdx.x) * a.rows, n_end = min(a.N, n0 + a.rows);
  bool staged = false;  // u's copies are issued after this warp's first batch of v loads

  // ---- phase 1: tp[s, m, j] = sum over k of split s of x[m, k] v[j, k] (pivoted: x's gathered columns)
  // Units q = s r + j, a CTA's warps consecutive: r % 8 == 0, so they share s (one gather a CTA and split) and
  // every warp of the CTA runs the same iterations (the gather's barriers).
  const int64_t units = a.r * a.S;
  int cur_s = -1;  // the split whose columns xg holds
  for (int64_t q0 = int64_t(blockIdx.x) * kWarps; q0 < units; q0 += int64_t(gridDim.x) * kWarps) {
    const int64_t q = q0 + warp, j = q % a.r;
    const int s = int(q0 / a.r);
    const bool active = q < units;
    const int64_t kb = s * a.ks, ke = active ? min(a.K1, kb + a.ks) : kb;
    const T* vj = a.v + j * a.K1;
    int64_t k0 = kb + lane * kLaneK;
    uint4 w[B];
    auto load = [&] {
#pragma unroll
      for (int i = 0; i < B; ++i) {  // all of the batch requested before any is used
        const int64_t k = k0 + int64_t(i) * kWarpK;
        w[i] = k < ke ? __ldg(reinterpret_cast<const uint4*>(vj + k)) : make_uint4(0, 0, 0, 0);
      }
    };
    load();
    if (!staged) {  // (each warp's first batch is in flight: u's copies queue behind it)
      stage_u(a, us, n0, n_end);
      staged = true;
    }
    if constexpr (kPivoted) {
      if (s != cur_s) {  // (CTA-uniform)
        __syncthreads();  // every warp done with the previous split's columns
        gather_split<T, M>(a, xg, kb, min(a.K1, kb + a.ks));
        __syncthreads();
        cur_s = s;
      }
    }
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    while (k0 < ke) {
#pragma unroll
      for (int m = 0; m < M; ++m) {  // x's row m for the whole batch in one round trip, then the sums
        uint4 xv[B];
#pragma unroll
        for (int i = 0; i < B; ++i) {  // (a load past the split's end reads its last chunk: no guard before the load)
          const int64_t k = min(k0 + int64_t(i) * kWarpK, ke - kLaneK);
          xv[i] = kPivoted ? ld_shared16(xg + m * a.ks + (k - kb)) : __ldg(reinterpret_cast<const uint4*>(a.x + m * a.K + k));
        }
#pragma unroll
        for (int i = 0; i < B; ++i) {
          if (k0 + int64_t(i) * kWarpK < ke) {
            float f[8];
            to_f32x8<T>(xv[i], f);
            acc[m] += dot8<T>(w[i], f);
          }
        }
      }
      k0 += int64_t(B) * kWarpK;
      if (k0 < ke) load();
    }
    if (active) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float t = warp_sum(acc[m]);
        if (lane == 0) a.tp[(int64_t(s) * M + m) * a.r + j] = t;
      }
    }
  }
  if (!staged) stage_u(a, us, n0, n_end);  // a CTA without phase-1 work
  if constexpr (kPivoted) {  // t's identity block: x's pivot columns (each thread sums its own entries below)
    for (int64_t e = threadIdx.x; e < int64_t(M) * a.r; e += kThreads) {
      const int64_t m = e / a.r, q = a.perm[e % a.r];
      ts[e] = q >= 0 && q < a.K ? to_f32<T>(a.x[m * a.K + q]) : 0.0f;
    }
  }

  cooperative_groups::this_grid().sync();  // every split sum written and visible

  // ---- phase 2: y[m, n] = sum over j of u[n, j] t[m, j] + bias[n], t = the splits' sum
  for (int64_t e = threadIdx.x; e < int64_t(M) * a.r; e += kThreads) {
    float t = kPivoted ? ts[e] : 0.0f;
    for (int s = 0; s < a.S; ++s) t += a.tp[int64_t(s) * M * a.r + e];  // written in this launch: plain loads
    ts[e] = t;
  }
  cp_async_wait<0>();
  __syncthreads();  // t and every thread's copies of u
  const int64_t chunks_row = a.r / kLaneK;
  for (int64_t i = warp; i < n_end - n0; i += kWarps) {
    const int64_t n = n0 + i;
    const T* row = i < a.staged ? us + i * a.r : a.u + n * a.r;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    for (int64_t c = lane; c < chunks_row; c += 32) {
      const uint4 w = i < a.staged ? ld_shared16(row + c * kLaneK) : __ldg(reinterpret_cast<const uint4*>(row + c * kLaneK));
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] += dot8<T>(w, ts + m * a.r + c * kLaneK);
    }
    const float b = a.bias != nullptr ? to_f32<T>(a.bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float sum = warp_sum(acc[m]);
      if (lane == 0) a.y[m * a.N + n] = from_f32<T>(sum + b);
    }
  }
#endif
}

// REPARAM_LOWRANK_GEMV=1: this path for plain and pivoted factors at M <= kMaxM (off until the H200 times it against the
// two cuBLAS products: bench_lowrank's peer cuda_gemv). REPARAM_LOWRANK_GEMV_STAGE_ROWS=n caps the rows of u a
// CTA copies to shared memory (0: every row read from L2 after the prefetch; peer cuda_gemv_unstaged).
inline bool enabled() { return env_opt_in("REPARAM_LOWRANK_GEMV"); }

// CTAs of Kernel an SM with `smem` bytes of dynamic shared memory. The occupancy query costs host time an eager
// decode step feels, and its answer depends only on (kernel, device, smem): a few shapes a model, so kept.
template <auto Kernel>
inline int ctas_per_sm(int device, size_t smem) {
  static std::mutex mu;
  static std::vector<std::tuple<int, size_t, int>> seen;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [d, s, n] : seen)
    if (d == device && s == smem) return n;
  int n = 0;
  RK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, smem));
  if (seen.size() < 256) seen.emplace_back(device, smem, n);
  return n;
}

// Pivoted factors' gathered columns take at most this much of a CTA's shared memory (more K splits where not).
constexpr int64_t kGatherBytes = 24 * 1024;

template <class T, int M, bool kPivoted>
bool launch(Args<T> a, const Tensor& like, cudaStream_t stream) {
  constexpr auto kernel = lowrank_gemv_kernel<T, M, kPivoted>;
  const int device = like.get_device_index();
  // Two CTAs an SM (decode lives on loads in flight): each gets half the opt-in shared memory, less 1 KB
  // the runtime reserves per CTA.
  const int64_t budget = max_smem_optin(device) / 2 - 1024;
  const int sms = sm_count(device);
  // K splits: enough (row of v, split) units for every warp of the grid of 2 CTAs an SM, each split at least one
  // load a lane; pivoted, few enough columns a split for the gather.
  const int64_t k_loads = (a.K1 + kWarpK - 1) / kWarpK;
  int64_t splits = std::max<int64_t>(1, 2 * sms * kWarps / a.r);
  if (kPivoted) splits = std::max(splits, (int64_t(M) * a.K1 * int64_t(sizeof(T)) + kGatherBytes - 1) / kGatherBytes);
  splits = std::min(splits, k_loads);
  a.ks = (k_loads + splits - 1) / splits * kWarpK;
  a.S = int((a.K1 + a.ks - 1) / a.ks);
  const int64_t t_bytes = int64_t(M) * a.r * int64_t(sizeof(float)), row_bytes = a.r * int64_t(sizeof(T));
  const int64_t fixed = t_bytes + (kPivoted ? int64_t(M) * a.ks * int64_t(sizeof(T)) : 0);
  if (fixed + 16 > budget) return false;
  a.rows = (a.N + 2 * sms - 1) / (2 * sms);
  a.staged = std::min<int64_t>(a.rows, (budget - fixed) / row_bytes);
  const size_t smem = size_t(a.staged * row_bytes + fixed);
  allow_smem_optin<kernel>(device);  // (the opt-in maximum: later shapes may need more than this one)
  const int per_sm = ctas_per_sm<kernel>(device, smem);
  if (per_sm <= 0) return false;
  const int64_t grid = int64_t(std::min(per_sm, 2)) * sms;  // all co-resident: the grid barrier needs it
  a.rows = (a.N + grid - 1) / grid;
  a.staged = std::min(a.staged, a.rows);
  if (const char* cap = std::getenv("REPARAM_LOWRANK_GEMV_STAGE_ROWS"); cap != nullptr && cap[0] != '\0')
    a.staged = std::min<int64_t>(a.staged, std::max<int64_t>(0, std::atoll(cap)));  // (A/B: u from L2 instead)
  const size_t launch_smem = size_t(a.staged * row_bytes + fixed);  // (<= smem: as many CTAs fit)
  Tensor tp = torch::stable::new_empty(like, {int64_t(a.S) * M * a.r}, ScalarType::Float);
  a.tp = static_cast<float*>(tp.data_ptr());
  void* params[] = {&a};
  RK_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(unsigned(grid)), dim3(kThreads),
                                            params, launch_smem, stream));
  return true;  // tp is freed here; the caching allocator reuses it only after this launch
}

// y [M, N] = x [M, K] @ W^T + bias on this path when it applies (false: the caller takes another): W = u @ v for
// perm == nullptr (v [r, K]), else W = u @ [I | v] @ P with v = w [r, K - r] and perm [K]. The caller asks
// enabled() first.
template <class T>
bool run(const T* x, const T* v, const T* u, const int64_t* perm, const T* bias, T* y, int64_t M, int64_t N,
         int64_t K, int64_t r, const Tensor& like, cudaStream_t stream) {
  const int64_t K1 = perm ? K - r : K;  // phase 1's reduction length
  if (M < 1 || M > kMaxM || K1 < kLaneK || K1 % kLaneK != 0 || r % kLaneK != 0 ||
      K >= (int64_t(1) << 31) || r >= (int64_t(1) << 31) || N >= (int64_t(1) << 31) || !aligned16(v) ||
      !aligned16(u) || (!perm && !aligned16(x)))
    return false;
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>(like.get_device_index()) < 8) return false;
  Args<T> a{x, v, perm, u, bias, y, nullptr, N, K, K1, r, 0, 0, 0, 0};
  auto go = [&](auto pivoted) {
    constexpr bool P = decltype(pivoted)::value;
    switch (M) {
      case 1: return launch<T, 1, P>(a, like, stream);
      case 2: return launch<T, 2, P>(a, like, stream);
      case 3: return launch<T, 3, P>(a, like, stream);
      case 4: return launch<T, 4, P>(a, like, stream);
      case 5: return launch<T, 5, P>(a, like, stream);
      case 6: return launch<T, 6, P>(a, like, stream);
      case 7: return launch<T, 7, P>(a, like, stream);
      default: return launch<T, 8, P>(a, like, stream);
    }
  };
  return perm ? go(std::true_type{}) : go(std::false_type{});
}

}  // namespace lowrank_gemv
}  // namespace reparam
