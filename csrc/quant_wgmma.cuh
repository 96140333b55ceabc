// The quantized ops between decode and prefill (64 < M < REPARAM_DEQUANT_MIN_M; the lower end is
// REPARAM_WGMMA_MIN_M) on Hopper:
// warpgroup MMA (wgmma.mma_async, sm_90a) with the weights decoded in registers as the A operand.
//
// Why: at M = 64..511 the GEMM turns compute-bound, and mma.sync (the small-M path, the WMMA
// tiles) reaches only about two thirds of Hopper's tensor throughput; wgmma is the instruction
// that gets the rest. The weights keep the ops' plain layouts and their Frag decoders
// (small_m_gemm.cuh): a lane's 16-byte load of a weight row decodes into the two registers of
// that row for each k16 step, and the A operand of wgmma has the same register layout as
// mma.sync's, so the warp's 16 rows are rows g and g + 8 of each lane (y = x W^T computed as
// y^T = W x^T: weight rows are wgmma's M, the batch is its N).
//
// x is the B operand, from shared memory. A Frag maps the 16 k-slots of each step to k in
// whatever order makes its decode cheapest (int4: nibble pairs); x must follow the same map. So
// one small pass first writes x once in slot order (xs [M, Kp], Kp = K rounded up to the stage,
// zero beyond K), built with the Frag's own a() permutes; the main kernel then copies 16-byte
// chunks of xs with cp.async straight into wgmma's no-swizzle core-matrix layout.
//
// Work split: a CTA = kGroups warpgroups, each owning 64 weight rows (BN = 64 kGroups), against
// BM batch rows; a stage is 128 k (every format: U lane blocks per lane). Per stage each lane
// loads 2 rows x U chunks of weights (two stages ahead, in registers), the CTA stages the x tile
// of the next stage with cp.async (two buffers), and each warpgroup issues 8 wgmma m64nBMk16 and,
// while they run, decodes the next stage's weights into a second set of A registers (formats with
// decode work; plain fp16/bf16 factor rows skip that and stay one stage ahead). The grid
// runs the batch tiles of a weight block next to each other, so the weights are read from DRAM
// about once.
//
// Requirements (else the caller takes the small-M or the general path): sm_90 (the sm_90a cubin),
// K a multiple of the format's lane block, x and weight rows 16-byte aligned, REPARAM_WGMMA not "0".
#pragma once

#include "quant_dequant_mm.cuh"
#include "small_m_gemm.cuh"
#include "wgmma.cuh"

namespace reparam {
namespace quant_wgmma {

constexpr int kStageK = 128;   // k per stage
constexpr int kRowsPerGroup = 64;  // weight rows per warpgroup (wgmma M)
constexpr int kInstr = kStageK / 16;  // k16 instructions per stage

template <class Frag>
constexpr int lane_blocks() {  // lane blocks per lane per stage
  return kStageK / (4 * Frag::kLaneK);
}

// xs[m, s * 128 + 16 q + slot] = x[m, k] for the k that `Frag` maps to instruction q's slot of
// stage s (zero beyond K). One thread per 8-k vector of x: lane block blk = 4u + t of the stage,
// vector i inside it; Frag::a gives the words of slots (2t, 2t + 1) and (2t + 8, 2t + 9) for
// instruction q = u (kLaneK / 4) + 2i + h.
// Formats that gather x through a column map (PivotFrag) are read through frag.gather_x.
template <class Frag, class T>
__global__ void __launch_bounds__(256) slot_order_kernel(Frag frag, const T* __restrict__ x, T* __restrict__ xs,
                                                         int64_t M, int64_t K, int64_t Kp) {
  constexpr int kVec = Frag::kLaneK / 8;  // x vectors per lane block
  const int64_t per_row = Kp / 8;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < M * per_row;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = v / per_row, r = v % per_row;
    const int64_t s = r / (kStageK / 8);
    const int w = int(r % (kStageK / 8));  // vector within the stage
    const int blk = w / kVec, i = w % kVec, t = blk % 4, u = blk / 4;
    const int64_t k = s * kStageK + int64_t(Frag::kLaneK) * blk + 8 * i;
    uint4 xv = make_uint4(0u, 0u, 0u, 0u);
    if (k < K) {
      if constexpr (small_m::gathers_x<Frag>::value) xv = frag.gather_x(int(m), k);
      else xv = *reinterpret_cast<const uint4*>(x + m * K + k);
    }
    uint32_t* row = reinterpret_cast<uint32_t*>(xs + m * Kp + s * kStageK);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[4];
      Frag::a(xv, xv, h, a);
      const int q = u * (Frag::kLaneK / 4) + 2 * i + h;
      row[(16 * q + 2 * t) / 2] = a[0];
      row[(16 * q + 8 + 2 * t) / 2] = a[2];
    }
  }
}

// Shared memory of one stage: kInstr tiles of BM x 16 (k-slots), each in the no-swizzle K-major
// layout — 8-row core matrices of 16 bytes per row, the two k halves 128 bytes apart (LBO), groups
// of 8 batch rows 256 bytes apart (SBO).
template <int BM>
constexpr int stage_bytes() {
  return kInstr * BM * 32;
}
constexpr uint32_t kLbo = 128, kSbo = 256;

// K split over CTAs (blockIdx.z) when the output tiles alone would leave SMs idle (N = 4096 at
// M <= 256 has 32-64 tiles for 132 SMs): each split writes fp32 partials, the last CTA of a tile to
// arrive (split_k_counters.h) sums them in split order and finishes y — one launch, deterministic.
struct Split {
  float* part;         // [splits, M, N] when splits > 1
  unsigned* counters;  // [tiles], zero at rest
  int64_t per_split;   // stages per split
  int splits;
};

template <class Frag, class T, int BM, int kGroups>
__global__ void __launch_bounds__(128 * kGroups)
    wgmma_kernel(Frag frag, const T* __restrict__ xs, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N,
                 int64_t K, int64_t Kp, Split sp, int l2_ahead) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // wgmma needs sm_90a; the host never launches this elsewhere
#else
  constexpr int kThreads = 128 * kGroups, U = lane_blocks<Frag>();
  constexpr int kChunks = BM * (kStageK / 8);  // 16-byte x chunks per stage
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int tid = threadIdx.x, group = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t row_g = int64_t(blockIdx.y) * kRowsPerGroup * kGroups + group * kRowsPerGroup + 16 * warp + g;
  const int64_t rows[2] = {row_g, row_g + 8};  // this lane's A rows g and g + 8 of its warp's 16
  const int64_t s0 = int64_t(blockIdx.z) * sp.per_split;               // this split's stages: [s0, s_end)
  const int64_t s_end = min(Kp / kStageK, s0 + sp.per_split);

  // x tile of stage s into buffer b: chunk c = (row m, 16-byte piece p of the row's 256 bytes);
  // piece p holds slots 8 (p % 2) .. + 8 of instruction p / 2. A thread keeps one piece p and steps m
  // by kXRowStep (a multiple of 8), so its shared-memory slot and x address are a base plus a constant
  // stride per chunk, set up once (the per-chunk division, 64-bit product and bounds test cost ~25
  // instructions per chunk). A warp's 32 chunks are 8 consecutive rows (lane % 8) of 4 consecutive
  // pieces (lane / 8): each 8-lane group fills one 128-byte core matrix, so the warp's copy lands in
  // shared memory in 4 wavefronts, and x is read as 64 contiguous bytes per row. (Until 2026-11-30 a
  // warp took 16 pieces of 2 rows: all 32 chunks fell in the same 32 bytes of the bank space, 16
  // wavefronts per copy instead of 4: 1024 shared-memory cycles per stage at BM = 128, as many as
  // the stage's tensor work, where 256 suffice.)
  static_assert(kChunks % kThreads == 0 && kThreads % 128 == 0, "chunk walk");
  constexpr int kXRowStep = 8 * (kThreads / 128);  // rows between a thread's chunks
  const int xwarp = tid / 32;
  const int xp = 4 * (xwarp % 4) + lane / 8, xm0 = 8 * (xwarp / 4) + lane % 8;
  const uint32_t x_dst0 = (xp / 2) * (BM * 32) + (xm0 / 8) * kSbo + (xp % 2) * kLbo + (xm0 % 8) * 16;
  const T* x_src0 = xs + (m0 + xm0) * Kp + 8 * xp;
  const int x_rows = int(min(int64_t(BM), M - m0)) - xm0;  // this thread's chunk i is a row of x iff i * step < x_rows
  auto stage_x = [&](int64_t s, int b) {
    unsigned char* dst = smem_raw + b * stage_bytes<BM>() + x_dst0;
    const T* src = x_src0 + s * kStageK;
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
      const bool ok = i * kXRowStep < x_rows;
      cp_async16(dst + i * (kXRowStep / 8) * kSbo, ok ? static_cast<const void*>(src + i * kXRowStep * Kp) : xs,
                 ok ? 16 : 0);
    }
  };
  using Chunk = typename Frag::Chunk;
  auto load_w = [&](int64_t s, Chunk (&c)[2][U]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kt = s * kStageK + int64_t(Frag::kLaneK) * (4 * u + t);
        c[r][u] = (rows[r] < N && kt < K) ? frag.load(rows[r], kt) : Frag::zero();
      }
  };
  typename small_m::row_state_of<Frag>::type rs[2];
  if constexpr (small_m::has_row_state<Frag>::value) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r] < N) rs[r] = frag.row_state(rows[r]);
  }

  // The A registers of one stage: the two rows' chunks decoded by the format, instruction by instruction.
  auto decode = [&](const Chunk (&c)[2][U], uint32_t (&a)[kInstr][4]) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < Frag::kLaneK / 8; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int q = u * (Frag::kLaneK / 4) + 2 * i + h;
          uint32_t b0[2], b1[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if constexpr (small_m::has_row_state<Frag>::value) frag.b(c[r][u], rs[r], i, h, b0[r], b1[r]);
            else frag.b(c[r][u], i, h, b0[r], b1[r]);
          }
          a[q][0] = b0[0];  // row g, slots 2t, 2t + 1
          a[q][1] = b0[1];  // row g + 8
          a[q][2] = b1[0];  // row g, slots 2t + 8, 2t + 9
          a[q][3] = b1[1];
        }
  };

  // Weights prefetched into L2 l2_ahead stages ahead (beyond the registers' kAhead; 0: none): at
  // M <= 128 a stage's tensor work (0.3-0.6 us) is shorter than a loaded DRAM round trip, so the
  // register loads alone leave every stage waiting for its weights. No registers, nothing waited for.
  auto prefetch_w = [&](int64_t s) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kt = s * kStageK + int64_t(Frag::kLaneK) * (4 * u + t);
        if (rows[r] < N && kt < K) prefetch_l2(frag.at(frag.row(rows[r]), uint32_t(kt)));
      }
  };

  float acc[BM / 2];
#pragma unroll
  for (int e = 0; e < BM / 2; ++e) acc[e] = 0.f;
  // kOverlap (formats with real decode work: int4, int8, lut): stage s + 2's weights are loaded
  // during stage s, and stage s + 1's decoded while stage s's wgmmas run. Plain fp16/bf16 rows
  // (HalfFrag) have nothing to decode: stage s + 1's are loaded during stage s, and stage s's are
  // copied into the A registers at its start (one set of A registers: ~60 fewer).
  // Stage j's chunks live in cw[(j - s0) & 1] and (kOverlap) its A registers in a[(j - s0) & 1]; a
  // trip of the loop runs two stages with those parities fixed, so no register is copied from one
  // stage to the next. (Until 2026-11-30 each stage ended by moving the chunks in flight into the
  // current ones: those moves waited for the loads issued at the same stage's start, so every stage
  // lasted at least one DRAM round trip — seen in the SASS after the H200 timed M = 256 at ~3 us a
  // stage, every format alike.)
  constexpr bool kOverlap = Frag::kLaneK >= 16;
  constexpr int kAhead = kOverlap ? 2 : 1;  // stages the weights' register loads run ahead
  Chunk cw[2][2][U];
  uint32_t a[kOverlap ? 2 : 1][kInstr][4];
  stage_x(s0, 0);
  cp_async_commit();
  load_w(s0, cw[0]);
  if constexpr (kOverlap) {
    decode(cw[0], a[0]);
    if (s0 + 1 < s_end) load_w(s0 + 1, cw[1]);
  }
  auto stage = [&](int64_t s, auto parity) {
    constexpr int p = decltype(parity)::value;  // (s - s0) & 1: stage s's x buffer, chunks, A registers
    constexpr int ap = kOverlap ? p : 0;
    const bool more = s + 1 < s_end;
    if (more) {
      stage_x(s + 1, 1 - p);  // the other buffer: its last readers retired at the end of stage s - 1
      cp_async_commit();
      // stage s + kAhead's chunks replace stage s's (kOverlap: decoded during stage s - 1) or stage
      // s - 1's (decoded at stage s - 1's start)
      if (s + kAhead < s_end) load_w(s + kAhead, cw[kOverlap ? p : 1 - p]);
      if (l2_ahead > kAhead && s + l2_ahead < s_end) prefetch_w(s + l2_ahead);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (!kOverlap) decode(cw[p], a[0]);
    wgmma::fence_proxy_async();  // this thread's copies, visible to the tensor cores' reads ...
    __syncthreads();             // ... once every thread's are
    const unsigned char* tiles = smem_raw + p * stage_bytes<BM>();
    uint64_t desc[kInstr];
#pragma unroll
    for (int q = 0; q < kInstr; ++q) desc[q] = wgmma::desc_no_swizzle(tiles + q * (BM * 32), kLbo, kSbo);
    // Every register the wgmmas read is final before the fence (a register defined between them
    // makes ptxas inject another warpgroup arrive).
#pragma unroll
    for (int e = 0; e < BM / 2; ++e) wgmma::keep(acc[e]);
#pragma unroll
    for (int q = 0; q < kInstr; ++q) {
      wgmma::keep(desc[q]);
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma::keep(a[ap][q][j]);
    }
    wgmma::fence();
#pragma unroll
    for (int q = 0; q < kInstr; ++q) wgmma::mma_rs<BM, T>(acc, a[ap][q], desc[q]);
    wgmma::commit();
    // the next stage's decode overlaps this stage's tensor work
    if constexpr (kOverlap) {
      if (more) decode(cw[1 - p], a[1 - ap]);
    }
    wgmma::wait<0>();
#pragma unroll
    for (int q = 0; q < kInstr; ++q)
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma::keep(a[ap][q][j]);  // intact until the wgmmas reading them retired
#pragma unroll
    for (int e = 0; e < BM / 2; ++e) wgmma::keep(acc[e]);
    __syncthreads();  // every warpgroup is done with this buffer before stage s + 2 refills it
  };
  for (int64_t s = s0; s < s_end; s += 2) {
    stage(s, std::integral_constant<int, 0>{});
    if (s + 1 < s_end) stage(s + 1, std::integral_constant<int, 1>{});
  }

  // d[4j + 2 v1 + v0] = D[weight row g + 8 v1][batch row 8j + 2t + v0]
  auto finish = [&](float v, int64_t m, int64_t n) {
    v = v * frag.out_scale(n) + (bias ? to_f32<T>(bias[n]) : 0.f);
    if constexpr (small_m::gathers_x<Frag>::value) v += frag.out_add(int(m), n);  // the pivot columns
    y[m * N + n] = from_f32<T>(v);
  };
  float* part = sp.splits > 1 ? sp.part + int64_t(blockIdx.z) * M * N : nullptr;
#pragma unroll
  for (int e = 0; e < BM / 2; ++e) {
    const int j = e / 4, v0 = e % 2, v1 = (e / 2) % 2;
    const int64_t n = rows[v1], m = m0 + 8 * j + 2 * t + v0;
    if (n < N && m < M) {
      if (part) part[m * N + n] = acc[e];
      else finish(acc[e], m, n);
    }
  }
  if (sp.splits == 1) return;

  // Split K: the last CTA of this tile to arrive sums every split's partial, in split order.
  if (!arrived_last(&sp.counters[blockIdx.x + gridDim.x * blockIdx.y], sp.splits)) return;
  constexpr int BN = kRowsPerGroup * kGroups;
  const int64_t n0 = int64_t(blockIdx.y) * BN;
  finish_split_tile<kThreads>(
      sp.part, sp.splits, int64_t(M) * N, BM * BN,
      [&](int e) { return m0 + e / BN < M && n0 + e % BN < N ? (m0 + e / BN) * N + n0 + e % BN : int64_t(-1); },
      [&](int e, float v) { finish(v, m0 + e / BN, n0 + e % BN); });
#endif
}

// REPARAM_WGMMA=0 turns this path off (A/B benchmarks, bisecting).
inline bool enabled() { return env_switch_on("REPARAM_WGMMA"); }

// REPARAM_WGMMA_L2_AHEAD=d: the weights are also prefetched into L2 d stages ahead (0 or 1..2: off;
// default 4; bench_quant's peer cuda_wgmma_no_l2 times it off). Clamped to 0..16.
inline int l2_ahead() { return small_m::l2_ahead_from_env("REPARAM_WGMMA_L2_AHEAD", 4); }

// The smallest M this path takes: REPARAM_WGMMA_MIN_M, default 65 (M <= 64 stays on the small-M
// mma.sync path; which is faster at M = 33..64 is for the H200 to say: bench_quant times both).
inline int64_t min_m() {
  const char* v = std::getenv("REPARAM_WGMMA_MIN_M");
  return v == nullptr || v[0] == '\0' ? small_m::kMaxM + 1 : std::max<int64_t>(1, std::atoll(v));
}

// Whether this path may run M rows on like's GPU: from min_m() up to below the dequantize +
// cuBLAS threshold, switched on, Hopper.
inline bool applies(int64_t M, int64_t dequant_min_m, const Tensor& like) {
  return M >= min_m() && M < dequant_min_m && enabled() && small_m::compute_major(like.get_device_index()) == 9;
}

// Whether the binary of `Kernel` that this device loads was compiled from sm_90a code: a build
// without sm_90a (or a JIT from an older architecture's PTX) holds only the trap body.
template <auto Kernel>
bool has_wgmma_code(int device) {
  static int cached[64] = {0};  // 0: not asked yet, 1: yes, -1: no
  int& c = cached[device & 63];
  if (c == 0) {
    cudaFuncAttributes attr{};
    c = cudaFuncGetAttributes(&attr, Kernel) == cudaSuccess && attr.ptxVersion >= 90 ? 1 : -1;
    (void)cudaGetLastError();
  }
  return c > 0;
}

// Launches the slot-order pass and the GEMM; false (nothing launched) when the binary has no
// sm_90a code for it.
template <class Frag, class T, int BM, int kGroups>
bool launch(const Frag& frag, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K, const Tensor& like,
            cudaStream_t stream) {
  const int device = like.get_device_index();
  if (!has_wgmma_code<wgmma_kernel<Frag, T, BM, kGroups>>(device)) return false;
  const int64_t Kp = (K + kStageK - 1) / kStageK * kStageK;
  Tensor xs = torch::stable::new_empty(like, {M * Kp});
  T* xsp = static_cast<T*>(xs.data_ptr());
  slot_order_kernel<Frag, T><<<grid_stride_blocks(M * Kp / 8, device), 256, 0, stream>>>(frag, x, xsp, M, K, Kp);
  RK_CUDA_CHECK(cudaGetLastError());
  constexpr auto kernel = wgmma_kernel<Frag, T, BM, kGroups>;
  constexpr int smem = 2 * stage_bytes<BM>();
  static int per_sm[64] = {0};  // resident CTAs per SM, after the shared-memory opt-in (> 48 KB), per device
  if (per_sm[device & 63] == 0) {
    RK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int n = 0;
    RK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 128 * kGroups, smem));
    per_sm[device & 63] = std::max(n, 1);
  }
  const int64_t gx = (M + BM - 1) / BM, gy = (N + kRowsPerGroup * kGroups - 1) / (kRowsPerGroup * kGroups);
  // Split K just enough that the tiles times splits fill the resident CTAs once.
  const int64_t stages = Kp / kStageK, slots = int64_t(per_sm[device & 63]) * sm_count(device);
  int64_t splits = gx * gy >= slots ? 1 : std::min<int64_t>(stages, std::max<int64_t>(1, slots / (gx * gy)));
  const int64_t per_split = (stages + splits - 1) / splits;
  splits = (stages + per_split - 1) / per_split;
  Split sp{nullptr, nullptr, per_split, int(splits)};
  if (splits > 1) {
    sp.counters = split_k_counters(device, stream, gx * gy);
    if (sp.counters == nullptr) sp = Split{nullptr, nullptr, stages, 1};
  }
  Tensor part = torch::stable::new_empty(like, {sp.splits > 1 ? sp.splits * M * N : 1}, ScalarType::Float);
  if (sp.splits > 1) sp.part = static_cast<float*>(part.data_ptr());
  const dim3 grid(unsigned(gx), unsigned(gy), unsigned(sp.splits));
  wgmma_kernel<Frag, T, BM, kGroups><<<grid, 128 * kGroups, smem, stream>>>(frag, xsp, bias, y, int(M), N, K, Kp, sp,
                                                                           l2_ahead());
  RK_CUDA_CHECK(cudaGetLastError());
  return true;  // xs / part are freed here; the caching allocator reuses them only after this launch
}

// Runs y = x @ W^T + bias on this path when it applies; false means the caller takes another.
template <class Frag, class T>
bool linear_wgmma(const Frag& frag, bool weights_aligned, const T* x, const T* bias, T* y, int64_t M, int64_t N,
                  int64_t K, int64_t dequant_min_m, const Tensor& like, cudaStream_t stream) {
  if (!applies(M, dequant_min_m, like) || K % Frag::kLaneK != 0 || K >= small_m::kMaxK || !weights_aligned) return false;
  if (!small_m::rows_fit32(N, K)) return false;
  if (!small_m::gathers_x<Frag>::value && !aligned16(x)) return false;
  if ((N + 63) / 64 > 65535) return false;
  // REPARAM_WGMMA_BN=64: one warpgroup (64 weight rows) per CTA, 2 CTAs per SM, twice the x
  // traffic; the default 128: two warpgroups share each x tile. Which wins is for the H200 to say.
  // Batch tiles of 64 (wgmma n64) up to M = 64, else 128.
  const char* bn = std::getenv("REPARAM_WGMMA_BN");
  const bool one_group = bn != nullptr && std::atoi(bn) == 64;
  if (M <= 64) {
    if (one_group) return quant_wgmma::launch<Frag, T, 64, 1>(frag, x, bias, y, M, N, K, like, stream);
    return quant_wgmma::launch<Frag, T, 64, 2>(frag, x, bias, y, M, N, K, like, stream);
  }
  if (one_group) return quant_wgmma::launch<Frag, T, 128, 1>(frag, x, bias, y, M, N, K, like, stream);
  return quant_wgmma::launch<Frag, T, 128, 2>(frag, x, bias, y, M, N, K, like, stream);
}

// The register-fed tensor-core paths of a weight format: wgmma from min_m() on Hopper (this file),
// else mma.sync for M <= 64 (small_m_gemm.cuh); false: the caller takes quant::general_linear.
template <class Frag, class T>
bool register_fed_linear(const Frag& frag, bool weights_aligned, const T* x, const T* bias, T* y, int64_t M,
                         int64_t N, int64_t K, const Tensor& like, cudaStream_t stream) {
  return linear_wgmma(frag, weights_aligned, x, bias, y, M, N, K, quant::dequant_min_m(), like, stream) ||
         small_m::linear_small_m(frag, weights_aligned, x, bias, y, M, N, K, like, stream);
}

}  // namespace quant_wgmma
}  // namespace reparam
