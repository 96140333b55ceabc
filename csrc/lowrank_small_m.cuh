// Decode path of lowrank_linear and pivoted_lowrank_linear (1 <= M <= 64): both products of y = (x @ v^T) @ u^T + bias in
// one cooperative launch, each run as small_m_gemm.cuh's register-fed tensor-core GEMM over
// plain fp16/bf16 weights (HalfFrag: 16-byte loads of v and u rows are the mma's B operand as
// they are, no shared-memory staging):
//   phase 1  t[M, r] = x @ v^T      (split over K; the last CTA of each column block sums the
//                                     fp32 partials and writes t in x's dtype)
//   -- one grid barrier --
//   phase 2  y[M, N] = t @ u^T + bias  (split over r the same way)
// t never leaves L2 in practice (M * r elements). Against the WMMA path of lowrank_linear.cu
// (phase 0 zeroing, fp32 atomics, up to three barriers) this needs one barrier, no zeroing, no
// atomics on data (deterministic), and no shared-memory round trip of the weights.
//
// Pivoted factors (w [r, K - r], perm): phase 1 uses PivotFrag, which gathers x's non-pivot
// columns through perm while loading the A operand and adds the pivot columns in its epilogue,
// so no gather pass and still one barrier.
//
// Requirements (else the caller takes the WMMA path): the phase-1 reduction length (K, or
// K - r) >= 8 and a multiple of 8, r % 8 == 0, x (plain only), v and u 16-byte aligned, sm_80+,
// the split counters available.
#pragma once

#include <cooperative_groups.h>

#include "small_m_gemm.cuh"

namespace reparam {
namespace lowrank_small_m {

// Brings into L2 the weights that work unit (bx, by) of p (BN = 4 * 8 * NG rows) will read: every
// 128-byte line of its rows' K range, spread over the CTA's threads; each address passed lies inside
// the range (a row's first byte + 128 j, and its last chunk). No registers held, nothing waited for.
// The launch below runs it for its phase-2 units before phase 1.
template <int NG, class Frag, class T>
__device__ __forceinline__ void prefetch_unit_l2(const small_m::Problem<Frag, T>& p, int64_t bx, int64_t by) {
  constexpr int BN = small_m::kWarpsN * 8 * NG;
  const int64_t col0 = bx * BN, kb = by * p.kchunk, ke = min(p.K, kb + p.kchunk);
  const int rows = int(min(int64_t(BN), p.N - col0));
  if (rows <= 0 || ke <= kb) return;
  const uint32_t k_first = uint32_t(kb), k_last = uint32_t(ke - Frag::kLaneK);  // K % kLaneK == 0
  const auto* first0 = static_cast<const unsigned char*>(p.frag.at(p.frag.row(col0), k_first));
  const auto* last0 = static_cast<const unsigned char*>(p.frag.at(p.frag.row(col0), k_last));
  const int lines = int((last0 - first0) / 128) + 2;  // the last one: the row's last chunk
  for (int e = threadIdx.x; e < rows * lines; e += small_m::kThreads) {
    const int r = e / lines, j = e % lines;
    const typename Frag::Row row = p.frag.row(col0 + r);
    prefetch_l2(j == lines - 1 ? p.frag.at(row, k_last)
                               : static_cast<const unsigned char*>(p.frag.at(row, k_first)) + 128 * j);
  }
}

// Frag1: HalfFrag (plain v) or PivotFrag (pivoted w, x gathered through perm). Compiled for two CTAs
// per SM (the grid is every resident CTA, and decode lives on loads in flight): at M > 16 that costs
// spills of up to ~100 bytes per thread outside the main loop (ptxas; none in it: sass_budget --ops);
// without the bound sm_80 takes 160-180 registers there, one CTA per SM. kRing: both phases stream
// their weights through small_m's shared-memory ring (ring_bytes<NG>() of dynamic shared memory).
template <class Frag1, class T, int MT, int NG, bool kRing = false>
__global__ void __launch_bounds__(small_m::kThreads, 2)
    lowrank_small_m_kernel(small_m::Problem<Frag1, T> p1, small_m::Problem<small_m::HalfFrag<T>, T> p2,
                           bool prefetch_u) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 needs sm_80; the host never launches this below sm_80
#else
  extern __shared__ __align__(16) uint4 lowrank_ring[];
  // u does not depend on t: its phase-2 lines are requested now, so their DRAM reads overlap phase 1
  // and the barrier, and phase 2 reads them from L2 (prefetch_u: the host's choice, below).
  if (prefetch_u) {
    for (int64_t w = blockIdx.x; w < p2.columns * p2.splits; w += gridDim.x)
      prefetch_unit_l2<NG>(p2, w % p2.columns, w / p2.columns);
  }
  for (int64_t w = blockIdx.x; w < p1.columns * p1.splits; w += gridDim.x)
    small_m::run_unit<Frag1, T, MT, NG, true, false, kRing>(p1, w % p1.columns, w / p1.columns, lowrank_ring);
  cooperative_groups::this_grid().sync();  // t complete and visible
  for (int64_t w = blockIdx.x; w < p2.columns * p2.splits; w += gridDim.x)  // t was written in this launch:
    small_m::run_unit<small_m::HalfFrag<T>, T, MT, NG, false, false, kRing>(p2, w % p2.columns, w / p2.columns,
                                                                             lowrank_ring);  // coherent x loads
#endif
}

// REPARAM_LOWRANK_PREFETCH_U=1: phase 2's factor prefetched into L2 at the start (A/B: the peer cuda_prefetch_u
// of bench_lowrank), only where u takes at most half the L2, so that it is still there when phase 2 reads it.
// Off since session 42: the H200 (run 3, M = 1, graph) ran this launch in 16.0 / 21.3 us without it against
// 17.0 / 24.5 with it (8192^2 / 28672 x 8192, r = 512): u's prefetches compete with v's loads for DRAM while
// phase 1, the critical path, runs.
inline bool prefetch_u_enabled() { return env_opt_in("REPARAM_LOWRANK_PREFETCH_U"); }

template <auto Kernel, int NG, class Frag1, class T>
bool launch_with(const Frag1& f1, const T* x, const T* u, const T* bias, T* y, int64_t M, int64_t N, int64_t K1,
                 int64_t r, size_t smem, const Tensor& like, cudaStream_t stream) {
  using Half = small_m::HalfFrag<T>;
  const int device = like.get_device_index();
  const int64_t grid = small_m::resident_ctas<Kernel>(device, smem);  // all co-resident: the grid barrier needs it
  Tensor t = torch::stable::new_empty(like, {M * r});
  small_m::Problem<Frag1, T> p1{f1, x, nullptr, static_cast<T*>(t.data_ptr()), nullptr, nullptr, int(M), r, K1, 0, 0, 0};
  small_m::Problem<Half, T> p2{Half{u, r}, static_cast<const T*>(t.data_ptr()), bias, y, nullptr, nullptr, int(M), N, r,
                              0, 0, 0};
  small_m::plan<NG>(p1, grid);
  small_m::plan<NG>(p2, grid);
  if (p1.splits > 1 || p2.splits > 1) {
    unsigned* counters = split_k_counters(device, stream, p1.columns + p2.columns);
    if (counters == nullptr) return false;
    p1.counters = counters;
    p2.counters = counters + p1.columns;
  }
  Tensor part1 = small_m::attach_partials(p1, like), part2 = small_m::attach_partials(p2, like);
  bool prefetch_u = prefetch_u_enabled() && N * r * int64_t(sizeof(T)) <= l2_bytes(device) / 2;
  void* params[] = {&p1, &p2, &prefetch_u};
  RK_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(Kernel), dim3(unsigned(grid)),
                                            dim3(small_m::kThreads), params, smem, stream));
  return true;  // t / part1 / part2 are freed here; the caching allocator reuses them only after this launch
}

// The ring (REPARAM_SMALL_M_RING=1) where it keeps as many CTAs resident as the register-fed loop.
template <class Frag1, class T, int MT, int NG>
bool launch(const Frag1& f1, const T* x, const T* u, const T* bias, T* y, int64_t M, int64_t N, int64_t K1,
            int64_t r, const Tensor& like, cudaStream_t stream) {
  constexpr auto kernel = lowrank_small_m_kernel<Frag1, T, MT, NG>;
  constexpr auto ring_kernel = lowrank_small_m_kernel<Frag1, T, MT, NG, true>;
  constexpr int smem = small_m::ring_bytes<NG>();
  // (beside the ring the two phases' K-warp sums, at most 32 KB of static shared memory)
  if (small_m::ring_enabled() && small_m::ring_fits<ring_kernel, kernel>(like.get_device_index(), smem, 32 * 1024))
    return launch_with<ring_kernel, NG>(f1, x, u, bias, y, M, N, K1, r, smem, like, stream);
  return launch_with<kernel, NG>(f1, x, u, bias, y, M, N, K1, r, 0, like, stream);
}

// y = x @ W^T + bias on this path when it applies (false: the caller takes another): W = u @ v for
// perm == nullptr (v [r, K]), else W = u @ [I | v] @ P with v = w [r, K - r] and perm [K].
template <class T>
bool run(const T* x, const T* v, const T* u, const int64_t* perm, const T* bias, T* y, int64_t M, int64_t N,
         int64_t K, int64_t r, const Tensor& like, cudaStream_t stream) {
  const int64_t K1 = perm ? K - r : K;  // phase 1's reduction length
  if (!small_m::applies(M, like) || K1 < 8 || K1 % 8 != 0 || r % 8 != 0 || K >= small_m::kMaxK || r >= small_m::kMaxK ||
      !small_m::rows_fit32(r, K1) || !small_m::rows_fit32(N, r))
    return false;
  if (!aligned16(v) || !aligned16(u) || (!perm && !aligned16(x))) return false;
  auto go = [&](const auto& f1) {
    return small_m::for_tile_shape(M, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      return launch<std::decay_t<decltype(f1)>, T, MT, small_m::groups_for<MT>()>(f1, x, u, bias, y, M, N, K1, r,
                                                                                 like, stream);
    });
  };
  if (perm) return go(small_m::PivotFrag<T>{{v, K1}, x, perm, K, r});
  return go(small_m::HalfFrag<T>{v, K});
}

}  // namespace lowrank_small_m
}  // namespace reparam
