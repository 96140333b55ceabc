// The standalone kernels of the small-M tensor-core GEMM (small_m_gemm.cuh's run_unit, one work unit a CTA)
// and their host side: how many CTAs fit, how the work is cut into column blocks x K splits, the launch,
// and when the path applies.
#pragma once

#include <cstdlib>
#include <type_traits>

#include "small_m_gemm.cuh"

namespace reparam {
namespace small_m {

// A standalone kernel's CTA: the work unit (blockIdx.x, blockIdx.y) of the even split, or with p.stream
// CTAs (stream-K) range i of the problem's stages flattened column block by column block and cut into
// p.stream near-equal contiguous ranges [i U / P, (i + 1) U / P): a column block's stages then lie in the
// ranges of CTAs first..last (cta_of), its pieces in K order. The even split gives every CTA one K range
// of one column block, columns x splits <= slots CTAs in all: 224 column blocks (28672 rows) fill 224 of
// an H200's 264 slots, 10 of them 160; stream-K fills every slot with equal work wherever there are more
// stages than slots. One loop around run_range (inlined once): the even split passes once.
template <class Frag, class T, int MT, int NG, bool kAhead = false, bool kRing = false, bool kXRing = false>
__device__ __forceinline__ void run_cta(const Problem<Frag, T>& p, uint4* ring = nullptr, uint32_t* tables = nullptr) {
  constexpr int kUnitK = kWarpsK * 4 * Frag::kLaneK;
  // Only u and u_end live across run_range, 32-bit (U < 2^31, checked by the host): with 64-bit state
  // held across the main loop ptxas spilled it on sm_80 (4 local loads or stores a stage at M <= 16).
  const uint32_t P = uint32_t(p.stream), i = blockIdx.x;
  const uint32_t S = uint32_t((p.K + kUnitK - 1) / kUnitK), U = uint32_t(p.columns) * S;  // stages: a column block's, all
  auto cta_of = [&](uint32_t v) { return uint32_t(((uint64_t(v) + 1) * P + U - 1) / U) - 1; };  // the range holding v
  uint32_t u = P > 0 ? uint32_t(uint64_t(i) * U / P) : 0u;
  const uint32_t u_end = P > 0 ? uint32_t(uint64_t(i + 1) * U / P) : 1u;
  while (u < u_end) {
    int64_t bx, kb, ke, stages, piece, pieces;
    if (P > 0) {
      const uint32_t c = u / S, c_end = min(u_end, (c + 1) * S), first = cta_of(c * S);
      bx = c;
      kb = int64_t(u - c * S) * kUnitK;
      ke = min(p.K, int64_t(c_end - c * S) * kUnitK);
      stages = c_end - u;
      piece = i - first;
      pieces = cta_of((c + 1) * S - 1) - first + 1;
    } else {
      bx = blockIdx.x;
      kb = blockIdx.y * p.kchunk;
      ke = min(p.K, kb + p.kchunk);
      stages = p.kchunk / kUnitK;
      piece = blockIdx.y;
      pieces = p.splits;
    }
    run_range<Frag, T, MT, NG, true, kAhead, kRing, kXRing>(p, bx, kb, ke, stages, piece, pieces, ring, tables);
    u = P > 0 ? min(u_end, (u / S + 1) * S) : u_end;  // the next column block's first stage
  }
}

// One launch of one problem: run_cta: the even split's work unit (bx, by), or stream-K's range.
template <class Frag, class T, int MT, int NG>
__global__ void __launch_bounds__(kThreads, (ctas_per_sm<Frag, MT>())) small_m_kernel(Problem<Frag, T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 needs sm_80; the host never launches this below sm_80
#else
  if constexpr (has_smem_tables<Frag>::value) {  // Frag::kTableBytes of dynamic shared memory
    extern __shared__ __align__(16) uint4 small_m_tables[];
    run_cta<Frag, T, MT, NG, true>(p, nullptr, reinterpret_cast<uint32_t*>(small_m_tables));
  } else {
    run_cta<Frag, T, MT, NG, true>(p);
  }
#endif
}

// The same with the weights through the shared-memory ring (ring_bytes<NG>() of dynamic shared memory),
// and with kX x too (x_ring_bytes<Frag, T, MT>() more).
template <class Frag, class T, int MT, int NG, bool kX>
__global__ void __launch_bounds__(kThreads, (ctas_per_sm<Frag, MT>())) small_m_ring_kernel(Problem<Frag, T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(16) uint4 small_m_ring[];
  run_unit<Frag, T, MT, NG, true, true, true, kX>(p, blockIdx.x, blockIdx.y, small_m_ring);
#endif
}

inline int compute_major(int device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device); }

// How many CTAs of `Kernel` (kThreads each, `smem` bytes of dynamic shared memory) fit on the GPU at once.
template <auto Kernel>
inline int64_t resident_ctas(int device, size_t smem = 0) {
  return resident_ctas_of<Kernel>(device, kThreads, smem);
}

// Stages ahead to prefetch weights into L2, from variable `name` (unset or empty: `fallback`), clamped to
// 0..16: the wgmma loop's REPARAM_WGMMA_L2_AHEAD (quant_wgmma.cuh). (The small-M loop's
// REPARAM_SMALL_M_L2_AHEAD is gone since session 37: Problem says why.)
inline int l2_ahead_from_env(const char* name, int fallback = 0) {
  const char* v = std::getenv(name);
  const long long d = v == nullptr || v[0] == '\0' ? fallback : std::atoll(v);
  return d < 0 ? 0 : d > 16 ? 16 : int(d);
}

// REPARAM_SMALL_M_X_AHEAD=1: x of each stage prefetched into L1 a stage ahead (Problem::x_ahead). Off
// until the H200 has timed it (bench_quant's peer cuda_x_ahead); the prediction is in docs/quant.md.
inline bool x_ahead_enabled() { return env_opt_in("REPARAM_SMALL_M_X_AHEAD"); }

// REPARAM_SMALL_M_T=0: M <= 8 takes the M <= 16 tile instead of the transposed one (A/B timing).
inline bool transposed_tile_enabled() { return env_switch_on("REPARAM_SMALL_M_T"); }

// REPARAM_SMALL_M_RING selects the shared-memory rings (kRingStages in small_m_gemm.cuh), each taken only
// where it keeps as many CTAs per SM as the register-fed loop. Unset (the default, kRingX): x and the
// weights through the ring on the tiles where x fits it (x_fits_ring: M > 8), the register loop elsewhere
// -- measured on the H200 (benchmarks/results/h200/int4_linear.json and beside it, peers cuda_ring_x /
// cuda_ring): 8192^2 fp16 graph, M = 64 int4 46.1 vs 90.2 us, int8 50.0 vs 74.0, lut 46.0 vs 87.5; M = 16
// int4 25.7 vs 25.7, int8 29.0 vs 33.5, lut 28.5 vs 48.8; at M = 1 the weights' ring alone lost (int4
// 20.8 vs 19.0 us). 1: the weights' ring on every tile; 2: x too where it fits, the weights' ring
// elsewhere; 0 (anything else): no ring. Returns 0, 1, 2 or kRingX.
constexpr int kRingX = 3;
inline int ring_mode() {
  const char* v = std::getenv("REPARAM_SMALL_M_RING");
  if (v == nullptr || v[0] == '\0') return kRingX;
  return v[0] == '1' ? 1 : v[0] == '2' ? 2 : 0;
}
// The weights' ring on the tiles that do not carry x in it (modes 1 and 2).
inline bool ring_enabled() { const int m = ring_mode(); return m == 1 || m == 2; }
// x and the weights in the ring where x fits it (mode 2 and the default).
inline bool x_ring_enabled() { const int m = ring_mode(); return m == 2 || m == kRingX; }

// The n8-groups per warp for MT m16 tiles (BN = 4 * 8 * groups rows per column block).
template <int MT> constexpr int groups_for() { return MT <= 2 ? 4 : 2; }

// f(std::integral_constant<int, MT>{}) for the tile shape of M rows (1..64): one place for the
// M -> template-shape choice of every launcher. MT = 0: the transposed tile (M <= 8).
template <class F>
bool for_tile_shape(int64_t M, F&& f) {
  if (M <= 8 && transposed_tile_enabled()) return f(std::integral_constant<int, 0>{});
  if (M <= 16) return f(std::integral_constant<int, 1>{});
  if (M <= 32) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 4>{});
}

// REPARAM_SMALL_M_STREAM_K=1: the standalone kernels share their stages evenly among every slot (run_cta's
// stream-K) where the even split leaves slots idle. Off until the H200 has timed it (bench_quant's peer
// cuda_stream_k); the prediction is in docs/quant.md.
inline bool stream_k_enabled() { return env_opt_in("REPARAM_SMALL_M_STREAM_K"); }

// Cuts p into columns x splits: split K just enough that `slots` (the CTAs resident at once) cover
// the GPU in one wave. stream_k: where that leaves slots idle, min(slots, stages) CTAs share the stages
// instead (p.stream; run_cta), p.splits then the most pieces of one column block.
template <int NG, class Frag, class T>
void plan(Problem<Frag, T>& p, int64_t slots, bool stream_k = false) {
  constexpr int BN = kWarpsN * 8 * NG;
  constexpr int kUnitK = kWarpsK * 4 * Frag::kLaneK;
  p.columns = (p.N + BN - 1) / BN;
  const int64_t units = (p.K + kUnitK - 1) / kUnitK;
  p.splits = p.columns >= slots ? 1 : std::max<int64_t>(1, std::min(units, slots / p.columns));
  const int64_t per_split = (units + p.splits - 1) / p.splits;
  p.splits = (units + per_split - 1) / per_split;
  p.kchunk = per_split * kUnitK;
  p.stream = 0;
  const int64_t total = p.columns * units, ctas = std::min(slots, total);
  if (stream_k && ctas > p.columns * p.splits && total < (int64_t(1) << 31)) {  // (run_cta: 32-bit stages)
    const int64_t least = total / ctas;  // stages of the shortest range (>= 1)
    p.stream = ctas;
    p.splits = (units - 1 + least - 1) / least + 1;  // ranges of >= least stages meeting `units` of them
  }
}

// The fp32 partials of p (a one-element placeholder when K is not split); sets p.part. Keep the
// tensor until the launch is enqueued (the caching allocator reuses it only after that launch).
template <class Frag, class T>
Tensor attach_partials(Problem<Frag, T>& p, const Tensor& like) {
  Tensor part = torch::stable::new_empty(like, {p.splits > 1 ? p.splits * p.M * p.N : 1}, ScalarType::Float);
  p.part = static_cast<float*>(part.data_ptr());
  return part;
}

// One launch of `Kernel` (small_m_kernel or small_m_ring_kernel) with `smem` bytes of dynamic
// shared memory; kStreamK: Kernel runs run_cta (small_m_kernel: the register loop; the rings keep the even
// split: run_cta's loop around them cost the x ring 17 instructions a stage, 416 -> 433 at M <= 16).
template <auto Kernel, int NG, bool kStreamK = false, class Frag, class T>
bool launch_with(Problem<Frag, T> p, size_t smem, const Tensor& like, cudaStream_t stream) {
  const int device = like.get_device_index();
  plan<NG>(p, resident_ctas<Kernel>(device, smem), kStreamK && stream_k_enabled());
  if (p.columns >= (int64_t(1) << 31) || p.splits >= 65536) return false;
  if (p.splits > 1) {
    p.counters = split_k_counters(device, stream, p.columns);
    if (p.counters == nullptr) return false;
  }
  Tensor part = attach_partials(p, like);
  const dim3 grid = p.stream > 0 ? dim3(unsigned(p.stream)) : dim3(unsigned(p.columns), unsigned(p.splits));
  Kernel<<<grid, kThreads, smem, stream>>>(p);
  RK_CUDA_CHECK(cudaGetLastError());
  return true;
}

// Whether RingKernel (smem bytes of ring) fits beside `static_smem` bytes of static shared memory (the
// K-warp sums) and keeps as many CTAs per SM as Kernel, the register-fed loop; lets it launch so.
template <auto RingKernel, auto Kernel>
bool ring_fits(int device, int smem, int static_smem) {
  if (smem + static_smem > max_smem_optin(device)) return false;
  allow_smem_optin<RingKernel>(device, smem);
  return resident_ctas<RingKernel>(device, smem) >= resident_ctas<Kernel>(device);
}

// Launches RingKernel where ring_fits (the K-warp sums: at most 16 KB).
template <auto RingKernel, auto Kernel, int NG, class Frag, class T>
bool try_ring(const Problem<Frag, T>& p, int smem, const Tensor& like, cudaStream_t stream) {
  return ring_fits<RingKernel, Kernel>(like.get_device_index(), smem, 16 * 1024) &&
         launch_with<RingKernel, NG>(p, smem, like, stream);
}

// The dynamic shared memory a kernel running Frag needs for its tables (0: Frag has none), with Kernel allowed
// to take it; -1 where the tables and the K-warp sums (16 KB) do not fit the device.
template <auto Kernel, class Frag>
int table_smem(int device) {
  if constexpr (has_smem_tables<Frag>::value) {
    if (Frag::kTableBytes + 16 * 1024 > max_smem_optin(device)) return -1;
    allow_smem_optin<Kernel>(device, Frag::kTableBytes);
    return Frag::kTableBytes;
  } else {
    return 0;
  }
}

template <class Frag, class T, int MT, int NG>
bool launch(const Frag& frag, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
            const Tensor& like, cudaStream_t stream) {
  constexpr auto kernel = small_m_kernel<Frag, T, MT, NG>;
  Problem<Frag, T> p{frag, x, bias, y, nullptr, nullptr, int(M), N, K, 0, 0, 0};
  p.x_ahead = x_ahead_enabled() ? 1 : 0;
  if constexpr (post_scales<Frag>::value) {  // (the register loop only)
    return launch_with<kernel, NG, true>(p, 0, like, stream);
  } else if constexpr (has_smem_tables<Frag>::value) {  // the tables take the shared memory a ring would
    const int smem = table_smem<kernel, Frag>(like.get_device_index());
    return smem >= 0 && launch_with<kernel, NG, true>(p, smem, like, stream);
  } else {
    if constexpr (x_fits_ring<Frag, MT>()) {
      if (x_ring_enabled() && try_ring<small_m_ring_kernel<Frag, T, MT, NG, true>, kernel, NG>(
                                  p, ring_bytes<NG>() + x_ring_bytes<Frag, T, MT>(), like, stream))
        return true;
    }
    if (ring_enabled() && try_ring<small_m_ring_kernel<Frag, T, MT, NG, false>, kernel, NG>(p, ring_bytes<NG>(), like, stream))
      return true;
    return launch_with<kernel, NG, true>(p, 0, like, stream);
  }
}

// REPARAM_SMALL_M=0 turns this path off (A/B benchmarks, bisecting).
inline bool enabled() { return env_switch_on("REPARAM_SMALL_M"); }

// Whether this path may run M rows on like's GPU: 1 <= M <= 64, switched on, sm_80+.
inline bool applies(int64_t M, const Tensor& like) {
  return M >= 1 && M <= kMaxM && enabled() && compute_major(like.get_device_index()) >= 8;
}

// Runs y = x @ W^T + bias on this path when it applies (see applies(); K a multiple of the
// format's lane block, 16-byte aligned x and weight rows); false means the caller takes the
// general path (quant_dequant_mm.cuh's general_linear).
// Whether this path takes the layout: applies(), K a multiple of the format's lane block, 16-byte aligned rows.
template <class Frag, class T>
bool takes(bool weights_aligned, const T* x, int64_t M, int64_t N, int64_t K, const Tensor& like) {
  return applies(M, like) && K % Frag::kLaneK == 0 && K < kMaxK && rows_fit32(N, K) && weights_aligned && aligned16(x);
}

template <class Frag, class T>
bool linear_small_m(const Frag& frag, bool weights_aligned, const T* x, const T* bias, T* y, int64_t M,
                    int64_t N, int64_t K, const Tensor& like, cudaStream_t stream) {
  if (!takes<Frag>(weights_aligned, x, M, N, K, like)) return false;
  return for_tile_shape(M, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    return launch<Frag, T, MT, groups_for<MT>()>(frag, x, bias, y, M, N, K, like, stream);
  });
}

// REPARAM_SMALL_M_POST_SCALE=1: int4 at M <= 8 with groups of a multiple of 128 applies its scales after the
// mma (Int4PostFrag, int4_format.cuh). Off until the H200 has timed it (bench_quant's peer cuda_post_scale);
// the prediction is in docs/quant.md.
inline bool post_scale_enabled() { return env_opt_in("REPARAM_SMALL_M_POST_SCALE"); }

// linear_small_m on the transposed tile alone (M <= 8): for formats that have no other tile (post_scales).
template <class Frag, class T>
bool linear_small_m_transposed(const Frag& frag, bool weights_aligned, const T* x, const T* bias, T* y, int64_t M,
                               int64_t N, int64_t K, const Tensor& like, cudaStream_t stream) {
  if (M > 8 || !transposed_tile_enabled() || !takes<Frag>(weights_aligned, x, M, N, K, like)) return false;
  return launch<Frag, T, 0, groups_for<0>()>(frag, x, bias, y, M, N, K, like, stream);
}

}  // namespace small_m
}  // namespace reparam
