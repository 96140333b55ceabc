// GEMM for small M (1..64) with weights streamed from memory, shared by
// int4_linear, int8_linear, lut_linear and vq_linear (standalone kernels in small_m_launch.cuh) and the low-rank ops'
// decode path (lowrank_small_m.cuh, two phases of it in one cooperative
// launch): tensor cores fed straight from registers.
// y[M, N] = x[M, K] @ W[N, K]^T + bias, W given by a "Frag" (its format).
//
// Why not quant_gemm.cuh's paths (fp32 decode on CUDA cores for M <= 8,
// dequantize to shared memory then WMMA above)? At M <= 64 the GEMM is
// memory-bound: the weight bytes must stream at full bandwidth and every
// instruction per weight counts. Here a lane loads 16 bytes of one weight row,
// decodes them in registers into half2 / bfloat162 pairs with a few integer
// and packed-half instructions (a "magic number" turns a code into a float's
// mantissa), and hands the pairs to mma.sync.m16n8k16 as the B operand. The
// packed weights keep each op's plain layout: no offline re-shuffle.
//
// The mma sums over its 16 k-slots in any order, so the slots need not be 16
// consecutive k: each format (HalfFrag in small_m_plain_formats.cuh for plain fp16/bf16 weights, the
// Frag structs in int4_linear.cu and int8_linear.cu) picks the slot -> k map that makes its decode cheapest, and
// builds the A operand (x) with the same map from 16-byte loads of
// x[m, kt + 8i .. +8), kt being the lane's block of kLaneK consecutive k. A step
// is s = 2i + h; a lane block holds kLaneK / 4 steps.
//
// A Frag provides: kLaneK (k per 16-byte weight load), Chunk (one lane's load
// plus what decoding needs), Row / row(n) (a weight row resolved once per work
// unit: a 32-bit offset, one register, see rows_fit32), load(row, kt) (kt a 32-bit offset along K; load(n, kt) does both)
// and at(row, kt) (the address load reads: the L2 prefetch's),
// zero(), b(chunk, i, h, b0, b1) (the B
// registers of step 2i + h), a(x_row_g, x_row_g8, h, a[4]) (the A registers of
// step 2i + h from that step pair's x vectors) and out_scale(n) (a per-output
// factor applied in the epilogue: int8's per-channel scale); optionally
// gather_x(m, k) = gather(m, gather_cols(k)) / out_add(m, n) (PivotFrag: x read through a column map, a
// per-output term added in the epilogue), RowState / row_state(n) (LutFrag:
// per-row registers loaded once per work unit, passed to b()) and kPlainX (a() is
// a_consecutive: the loop then loads x word by word into the A registers).
//
// The main loop is memory-bound, so its instruction count is the budget that
// matters: tools/sass_budget.py reads it from the SASS (docs/benchmarks.md).
// The CTA's shape, the rings' layout and Problem (what a launch hands the loop): small_m_shape.cuh.
//
// Work split: a CTA of 8 warps owns BN = 4 * 8 * NG output rows (4 warps along
// N, NG n8-groups each) and a K range (2 warps along K, 4 * kLaneK k per warp
// per stage). The next stage's weights are loaded while this one computes. The
// two K-warps are summed through shared memory; when K is split over CTAs
// (splits > 1, to fill every SM) the last CTA of a column block to finish
// sums the fp32 partials in split order (split_k_counters.h): one launch,
// deterministic, graph-capturable.
#pragma once

#include <cstdlib>
#include <type_traits>

#include "common.cuh"
#include "small_m_frag_traits.cuh"
#include "small_m_regs.cuh"
#include "small_m_shape.cuh"
#include "split_k_counters.h"

namespace reparam {
namespace small_m {

// One piece of work of problem p, by the whole CTA: column block bx over K range [kb, ke) (kb a multiple
// of the CTA stage, kUnitK; `stages` >= ceil((ke - kb) / kUnitK), in the form the caller's split knows
// it: from p.kchunk the even split's loops keep the SASS they had before stream-K), piece `piece` of the
// `pieces` that cover the column block (pieces > 1: its fp32 partial goes to p.part's slot `piece`, and
// the last piece to arrive sums the column block's partials in piece order). kXConst: x is not written during this kernel (read through the non-coherent
// cache); false when an earlier phase of the same launch wrote it. Every thread of the CTA must call this
// with the same arguments. run_unit below is the piece (bx, by) of the even split (p.kchunk, p.splits).
//
// MT = 0 is the transposed tile for M <= 8: the weights are the mma's A operand (16 rows: n8-groups
// 2q and 2q + 1 of the lane's rows, the same loads and decode) and x the B operand (its 8 columns
// are the x rows), so each mma takes 256 weights instead of 128 (half the mmas) and x needs one row
// per lane instead of two (half the x loads and permutes), at no extra registers: C = W x^T, the
// accumulators (weight row, x row) the transpose of the other tiles'.
// kAhead: the loop may prefetch x a stage ahead into L1 (p.x_ahead; the standalone and grouped kernels:
// the low-rank launch keeps its loop as it was). kRing: the weights stream through `ring` (ring_bytes<NG>() of
// shared memory; see kRingStages) instead of registers; kXRing: x too (after
// the weights' slots, x_ring_bytes<Frag, T, MT>() more; see x_fits_ring).
template <class Frag, class T, int MT, int NG, bool kXConst, bool kAhead = false, bool kRing = false, bool kXRing = false>
__device__ __forceinline__ void run_range(const Problem<Frag, T>& p, int64_t bx, int64_t kb, int64_t ke, int64_t stages,
                                          int64_t piece, int64_t pieces, uint4* ring = nullptr,
                                          uint32_t* tables = nullptr) {
  static_assert(!kXRing || (kRing && kXConst && x_fits_ring<Frag, MT>()), "x rides the ring only where it fits");
  static_assert(!kXRing || sizeof(T) == 2, "x rows of 4 kLaneK halves: 8 or 16 units");
  constexpr bool kT = MT == 0;
  static_assert(!kT || NG % 2 == 0, "the transposed tile pairs n8-groups into m16 weight tiles");
  constexpr int MTA = kT ? 1 : MT;          // x tiles (array extents)
  constexpr int XR = kT ? 1 : 2;            // x rows per lane per tile: g (and g + 8)
  constexpr int NA = kT ? NG / 2 : NG;      // accumulator tiles per x tile
  constexpr int BN = kWarpsN * 8 * NG;
  constexpr int ACC = MTA * NA * 4;
  constexpr int kStepK = 4 * Frag::kLaneK;  // k per warp per stage
  constexpr int kUnitK = kWarpsK * kStepK;  // k per CTA stage
  constexpr int kPairs = Frag::kLaneK / 8;  // 16-byte x vectors per lane block = step pairs
  __shared__ float red[kWarpsK - 1][kWarpsN][ACC][32];
  __syncthreads();  // a persistent CTA's previous unit may still be reading red

  const Frag& frag = p.frag;
  const T* __restrict__ x = p.x;
  const int M = p.M;
  const int64_t N = p.N, K = p.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp % kWarpsN, wk = warp / kWarpsN;
  const int g = lane / 4, t = lane % 4;
  const int64_t col0 = bx * BN;
  // This lane's weight row in n8-group 0, in 32 bits (N < 2^31, checked by the host): cheap row setup.
  const uint32_t row0 = uint32_t(col0) + wn * 8 * NG + g;

  // Stages of this warp: [0, full) lie wholly inside [kb, ke); stage `full` (when < nst) is the one
  // partial stage of a K range that kStepK does not divide. K % kLaneK == 0, so a lane's block is
  // wholly inside or wholly outside the range. Counting them up front keeps the bounds tests out of
  // the hot loop: in a full stage nothing is tested.
  const int64_t span = ke - kb - wk * kStepK;  // k from this warp's first block to the range end
  const int full = span >= kStepK ? int(min(int64_t(stages), (span - kStepK) / kUnitK + 1)) : 0;
  const int nst = span > 0 ? int(min(int64_t(stages), (span - 1) / kUnitK + 1)) : 0;
  // k as 32-bit offsets within rows (K < 2^30, checked by the host): one wide multiply-add
  // per address instead of 64-bit index arithmetic.
  const uint32_t kt0 = uint32_t(kb) + wk * kStepK + Frag::kLaneK * t;  // unsigned: no sign extension
  auto lane_k = [&](int st) { return kt0 + uint32_t(st) * kUnitK; };

  // Rows at or past N are read as row N - 1 and x rows at or past M as row M - 1: an mma's B
  // column n feeds only output column n and its A row m only output row m, and those are never
  // stored, so clamping costs no bounds test per load and no zeroed registers.
  typename Frag::Row wrow[NG];
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    wrow[j] = frag.row(p.row_base + min(row0 + 8 * j, uint32_t(N - 1)));
    keep_in_register(wrow[j].off);  // every Frag's Row is one offset, `off`
  }
  const T* xrow[MTA][XR];
  int xm[MTA][XR];
#pragma unroll
  for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
    for (int r = 0; r < XR; ++r) {
      xm[mt][r] = min(16 * mt + 8 * r + g, M - 1);
      xrow[mt][r] = x + uint64_t(uint32_t(xm[mt][r])) * uint32_t(K);  // one wide multiply (K < 2^30)
    }
  // x of the next stage into L1 (p.x_ahead), issued as stage st (full) starts computing: the lane's block
  // of each of its x rows, kLaneK elements from lane_k(st + 1), inside one 128-byte line (the block is
  // aligned to its size). Written as load_x's address + kUnitK, so it is this stage's x address with an
  // immediate offset (one instruction and one test a stage; the test of a loop-invariant flag and
  // st + 1 < full: in the loops around load() instead, the compiler re-laid load()'s branches, +7).
  // (the register loop only: the x ring copies x; the weights' ring alone did not pay, H200 run 3)
  constexpr bool kXAhead = kAhead && !kRing && !gathers_x<Frag>::value;
  const bool x_ahead = kXAhead && p.x_ahead != 0;
  auto prefetch_x = [&](int st, uint32_t kt) {
    if constexpr (kXAhead) {
      if (x_ahead && st + 1 < full) {
#pragma unroll
        for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
          for (int r = 0; r < XR; ++r)
            prefetch_l1(fold_x_offsets<Frag, MT>() ? xrow[mt][r] + kt + kUnitK : xrow[mt][r] + (kt + kUnitK));
      }
    }
  };
  // The weights of stage st (in the partial stage, a lane past the range end takes zero(): finite).
  // With the ring only their side data (has_side), and the 16 bytes by ring_copy.
  auto load = [&](int st, typename Frag::Chunk (&c)[NG]) {
    const uint32_t kt = lane_k(st);
    if constexpr (kRing) {
      const bool kin = st < full || kt < ke;
#pragma unroll
      for (int j = 0; j < NG; ++j) {
        if constexpr (has_side<Frag>::value) c[j] = kin ? frag.side(wrow[j], kt) : Frag::zero();
        else c[j] = Frag::zero();
      }
    } else if (st < full) {
#pragma unroll
      for (int j = 0; j < NG; ++j) c[j] = frag.load(wrow[j], kt);
    } else {
      const bool kin = kt < ke;
#pragma unroll
      for (int j = 0; j < NG; ++j) c[j] = kin ? frag.load(wrow[j], kt) : Frag::zero();
    }
  };
  // The ring: stage st's slots, and its copy (one commit group per call whatever st, so that at stage st,
  // before copying st + kRingStages - 1, waiting for all but the kRingStages - 2 newest means st landed).
  uint32_t ring_lane = threadIdx.x;  // (kept: recomputed from the thread index per stage otherwise)
  keep_in_register(ring_lane);
  [[maybe_unused]] auto ring_slot = [&](int st) { return ring + ((uint32_t(st) % kRingStages) * NG * kThreads + ring_lane); };
  // The x ring (kXRing): [stage][K-warp][16 MT rows][kXU units]. This thread copies unit xu of rows
  // xr0 + kXPass c (clamped to M - 1) for its warpgroup; a lane reads units kPairs t + i of its rows g (+ 8),
  // at x_unit's places: x_lane + (i ^ x_swz) (the XOR touches only the bits below kPairs).
  constexpr int kXRows = 16 * MT, kXU = 4 * kPairs, kXPass = 128 / kXU;  // rows copied per pass
  constexpr int kXUnits = kXRing ? kXU : 16;  // (x_unit's row width; unused without the x ring)
  [[maybe_unused]] const int xu = threadIdx.x % kXU, xr0 = (threadIdx.x % 128) / kXU;
  [[maybe_unused]] const int xu_phys = x_unit<kXUnits>(xu, xr0);
  [[maybe_unused]] const int x_lane = kXU * g + kPairs * t, x_swz = x_unit<kXUnits>(kPairs * t, g) - kPairs * t;
  [[maybe_unused]] const uint32_t xk0 = uint32_t(kb) + wk * kStepK + 8 * xu;  // this thread's unit at stage 0
  [[maybe_unused]] auto x_slot = [&](int st) {
    return ring + (kRingStages * NG * kThreads + ((uint32_t(st) % kRingStages) * kWarpsK + wk) * kXRows * kXU);
  };
  [[maybe_unused]] auto ring_copy = [&](int st) {
    const uint32_t kt = lane_k(st);
    if (st < nst && (st < full || kt < ke)) {  // a partial stage's lanes past the range end copy nothing
      uint4* dst = ring_slot(st);
#pragma unroll
      for (int j = 0; j < NG; ++j) cp_async16(dst + j * kThreads, frag.at(wrow[j], kt), 16);
    }
    if constexpr (kXRing) {
      const uint32_t xk = xk0 + uint32_t(st) * kUnitK;
      if (st < nst && (st < full || xk < ke)) {  // (units past the range end are read by no lane)
        uint4* dst = x_slot(st) + kXU * xr0 + xu_phys;
#pragma unroll
        for (int c = 0; c < kXRows / kXPass; ++c) {
          const int r = min(xr0 + kXPass * c, M - 1);
          cp_async16(dst + kXU * kXPass * c, x + (uint64_t(uint32_t(r)) * uint32_t(K) + xk), 16);
        }
      }
    }
    cp_async_commit();
  };
  // x[m, k .. k + 8) as one 16-byte vector, or gathered by the format (pivoted factors).
  // (kt and the vector's offset 8 i added to the pointer separately: as one 32-bit sum they could
  // wrap, so the compiler could not fold 8 i into the load's immediate offset; fold_x_offsets.)
  auto load_x = [&](int mt, int r, uint32_t kt, int i, const typename x_cols_of<Frag>::type& cols) -> uint4 {
    if constexpr (gathers_x<Frag>::value) {
      return frag.gather(xm[mt][r], cols);
    } else {
      const uint4* v = reinterpret_cast<const uint4*>(fold_x_offsets<Frag, MT>() ? xrow[mt][r] + kt + 8 * i
                                                                                : xrow[mt][r] + (kt + 8 * i));
      if constexpr (kXConst) return __ldg(v);
      else return __ldcg(v);
    }
  };
  // y = acc * out_scale(n) + out_add(m, n) + bias[n]
  auto finish = [&](float acc_v, int m, int64_t n) -> float {
    float v = acc_v * frag.out_scale(p.row_base + n) + (p.bias ? to_f32<T>(p.bias[n]) : 0.f);
    if constexpr (gathers_x<Frag>::value) v += frag.out_add(m, n);
    return v;
  };

  float acc[MTA][NA][4];
#pragma unroll
  for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
    for (int j = 0; j < NA; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;

  typename Frag::Chunk cur[NG], nxt[NG];
  if constexpr (kRing) {
#pragma unroll
    for (int st = 0; st < kRingStages - 1; ++st) ring_copy(st);
  }
  if (nst > 0) load(0, cur);
  // Per-row state that does not change along K (LutFrag: the row's table in registers; VqPairFrag: where
  // the row's table sits in shared memory, staged here while stage 0's weights are in flight), once per unit.
  typename row_state_of<Frag>::type rs[NG];
  if constexpr (has_smem_tables<Frag>::value) {
    const int64_t table0 = p.row_base + col0;  // the format's row of the block's first output
    frag.stage_tables(tables, table0);
    __syncthreads();  // (every thread: outside the nst test)
#pragma unroll
    for (int j = 0; j < NG; ++j)
      rs[j] = frag.row_state(tables, table0, p.row_base + min(row0 + 8 * j, uint32_t(N - 1)));
  } else if constexpr (has_row_state<Frag>::value) {
#pragma unroll
    for (int j = 0; j < NG; ++j) rs[j] = frag.row_state(p.row_base + min(row0 + 8 * j, uint32_t(N - 1)));
  }
  // One stage's mmas. kTail (the partial stage only): a lane past the range end reads no x (zeros; its
  // weights are zero() chunks, finite), so it adds nothing. Full stages test nothing.
  using Chunks = typename Frag::Chunk[NG];
  // x word by word only at M <= 16: with more m16 tiles the loads held ahead spill registers.
  constexpr bool kWordX = MT <= 1 && loads_x_words<Frag>::value && !kXRing;  // (the x ring: 16-byte vectors)
  // Post-scaling formats (post_scales: Int4PostFrag): a stage's mmas go to st_acc, x against Frag::ones()
  // to sums, and Frag::post folds them into acc at the stage's end.
  constexpr bool kPost = post_scales<Frag>::value;
  static_assert(!kPost || (kT && !kRing), "post-scaling: the transposed tile's register loop only");
  auto compute = [&](auto tail, int st, const Chunks& held) {
    constexpr bool kTail = decltype(tail)::value;
    const uint32_t kt = lane_k(st);
    const bool kin = !kTail || kt < ke;
    typename Frag::Chunk cur[NG];  // held (a copy the compiler folds away), with the ring its 16 bytes
#pragma unroll
    for (int j = 0; j < NG; ++j) cur[j] = held[j];
    [[maybe_unused]] const uint4* xs = nullptr;
    [[maybe_unused]] float st_acc[NA][4], sums[4];  // (unused, so not allocated, without kPost)
    [[maybe_unused]] uint32_t ones[4];
    if constexpr (kPost) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        sums[c] = 0.f;
#pragma unroll
        for (int q = 0; q < NA; ++q) st_acc[q][c] = 0.f;
      }
      Frag::ones(ones);
    }
    if constexpr (!kTail) prefetch_x(st, kt);
    if constexpr (kRing) {
      cp_async_wait<kRingStages - 2>();  // this thread's copies of stage st landed ...
      if constexpr (kXRing) {  // ... and the warpgroup's; all done reading stage st - 1
        static_assert(kWarpsK == 2, "one named barrier per K-warp's warpgroup");
        if (wk == 0) warpgroup_bar<1>();
        else warpgroup_bar<2>();
      }
      ring_copy(st + kRingStages - 1);  // into the slots stage st - 1 read
      if constexpr (kXRing) xs = x_slot(st) + x_lane;
      const uint4* src = ring_slot(st);
#pragma unroll
      for (int j = 0; j < NG; ++j) cur[j].q = kin ? ld_shared16(src + j * kThreads) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      [[maybe_unused]] uint4 xv[MTA][XR];  // x[m, kt + 8i .. +8) for m = 16 mt + g (+ 8); unused if kWordX
      if constexpr (kXRing) {  // rows 16 mt + 8 r + g: unit kPairs t + i, swizzled
#pragma unroll
        for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
          for (int r = 0; r < XR; ++r)
            xv[mt][r] = kin ? ld_shared16(xs + kXU * (16 * mt + 8 * r) + (i ^ x_swz)) : make_uint4(0u, 0u, 0u, 0u);
      } else if constexpr (!kWordX) {
        typename x_cols_of<Frag>::type cols{};  // (gathered x: the pair's columns, once for every row)
        if constexpr (gathers_x<Frag>::value) {
          if (kin) cols = frag.gather_cols(kt + 8 * i);
        }
#pragma unroll
        for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
          for (int r = 0; r < XR; ++r) xv[mt][r] = kin ? load_x(mt, r, kt, i, cols) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t a[MTA][4];  // kT: only a[0][0] and a[0][2] (row g), the B operand
        if constexpr (kWordX && kT) {
          // words 2h, 2h + 1 of row g: one 8-byte load (x rows are 16-byte aligned, kt % 8 == 0)
          const uint2* w = reinterpret_cast<const uint2*>(xrow[0][0] + kt + 8 * i + 4 * h);
          const uint2 v = kin ? (kXConst ? __ldg(w) : __ldcg(w)) : make_uint2(0u, 0u);
          a[0][0] = v.x;
          a[0][2] = v.y;
        } else if constexpr (kWordX) {
          // a_consecutive's words, each loaded straight into its A register: from 16-byte vectors the
          // compiler moved words into the mma's register quad, ~3 moves per mma (lut: 652 -> 538
          // instructions per stage at M <= 16)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const uint32_t* w = reinterpret_cast<const uint32_t*>(xrow[mt][e % 2] + kt + 8 * i) + 2 * h + e / 2;
              a[mt][e] = kin ? (kXConst ? __ldg(w) : __ldcg(w)) : 0u;
            }
        } else {
#pragma unroll
          for (int mt = 0; mt < MTA; ++mt) Frag::a(xv[mt][0], xv[mt][XR - 1], h, a[mt]);
        }
        // The weights' registers of step (i, h): the B pair of the lane's row in group j.
        auto wb = [&](int j, uint32_t& b0, uint32_t& b1) {
          if constexpr (has_row_state<Frag>::value) frag.b(cur[j], rs[j], i, h, b0, b1);
          else frag.b(cur[j], i, h, b0, b1);
        };
        if constexpr (kT) {
#pragma unroll
          for (int q = 0; q < NA; ++q) {  // A rows g / g + 8 = the lane's rows in groups 2q / 2q + 1
            uint32_t w[4];
            wb(2 * q, w[0], w[2]);
            wb(2 * q + 1, w[1], w[3]);
            if constexpr (kPost) Pair<T>::mma(st_acc[q], w, a[0][0], a[0][2]);
            else Pair<T>::mma(acc[0][q], w, a[0][0], a[0][2]);
          }
          if constexpr (kPost) Pair<T>::mma(sums, ones, a[0][0], a[0][2]);
        } else {
#pragma unroll
          for (int j = 0; j < NG; ++j) {
            uint32_t b0, b1;
            wb(j, b0, b1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Pair<T>::mma(acc[mt][j], a[mt], b0, b1);
          }
        }
      }
    }
    if constexpr (kPost) {
#pragma unroll
      for (int q = 0; q < NA; ++q) Frag::post(cur[2 * q], cur[2 * q + 1], st_acc[q], sums, acc[0][q]);
    }
  };
  // Stage st on chunks c while stage st + 1 loads into n (in flight during the mmas).
  auto step = [&](int st, const Chunks& c, Chunks& n) {
    if (st + 1 < nst) load(st + 1, n);
    if (st < full) compute(std::false_type{}, st, c);
    else compute(std::true_type{}, st, c);
  };
  // Full stages two at a time with the buffers swapping roles (a copy of a stage's chunks would
  // cost a move per register per stage), then at most one full and one partial stage.
  int st = 0;
  for (; st + 2 <= full; st += 2) {
    load(st + 1, nxt);
    compute(std::false_type{}, st, cur);
    if (st + 2 < nst) load(st + 2, cur);
    compute(std::false_type{}, st + 1, nxt);
  }
  for (; st < nst; ++st) {
    step(st, cur, nxt);
#pragma unroll
    for (int j = 0; j < NG; ++j) cur[j] = nxt[j];
  }

  // Sum the K-warps of each N-warp into warp wk == 0 (acc read flat: unrolled, so still registers).
  float* flat = &acc[0][0][0];
  if (wk > 0) {
#pragma unroll
    for (int e = 0; e < ACC; ++e) red[wk - 1][wn][e][lane] = flat[e];
  }
  __syncthreads();
  if (wk == 0) {
    for (int w = 0; w < kWarpsK - 1; ++w) {
#pragma unroll
      for (int e = 0; e < ACC; ++e) flat[e] += red[w][wn][e][lane];
    }
    // Accumulator c of (mt, j): row 16 mt + g (+ 8 for c >= 2), column 8 j + 2 t + c % 2; of the
    // transposed tile (j = q): weight row 8 (2q + c / 2) + g, x row 2 t + c % 2.
    float* out = pieces == 1 ? nullptr : p.part + piece * M * N;
#pragma unroll
    for (int mt = 0; mt < MTA; ++mt)
#pragma unroll
      for (int j = 0; j < NA; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int m = kT ? 2 * t + (c % 2) : 16 * mt + g + 8 * (c / 2);
          const int64_t n = col0 + wn * 8 * NG + (kT ? 8 * (2 * j + c / 2) + g : 8 * j + 2 * t + (c % 2));
          if (m >= M || n >= N) continue;
          if (out) {
            out[int64_t(m) * N + n] = acc[mt][j][c];
          } else {
            p.y[int64_t(m) * N + n] = from_f32<T>(finish(acc[mt][j][c], m, n));
          }
        }
  }
  if (pieces == 1) return;

  // Split K: the last CTA of this column block to arrive sums every piece's partial.
  if (!arrived_last(&p.counters[bx], pieces)) return;
  // (red, free again: arrived_last synced, is the scratch of a split shared between threads)
  static_assert(sizeof(red) / sizeof(float) >= kThreads, "the split shares fit in red");
  finish_split_tile<kThreads>(
      p.part, pieces, int64_t(M) * N, M * BN,
      [&](int e) { return col0 + e % BN < N ? int64_t(e / BN) * N + col0 + e % BN : int64_t(-1); },
      [&](int e, float v) { p.y[int64_t(e / BN) * N + col0 + e % BN] = from_f32<T>(finish(v, e / BN, col0 + e % BN)); },
      &red[0][0][0][0]);
}

// The work unit (column block bx, K range by) of the even split: p.splits ranges of p.kchunk.
template <class Frag, class T, int MT, int NG, bool kXConst, bool kAhead = false, bool kRing = false, bool kXRing = false>
__device__ __forceinline__ void run_unit(const Problem<Frag, T>& p, int64_t bx, int64_t by, uint4* ring = nullptr,
                                         uint32_t* tables = nullptr) {
  const int64_t kb = by * p.kchunk;
  run_range<Frag, T, MT, NG, kXConst, kAhead, kRing, kXRing>(p, bx, kb, min(p.K, kb + p.kchunk),
                                                          p.kchunk / (kWarpsK * 4 * Frag::kLaneK), by, p.splits,
                                                          ring, tables);
}

}  // namespace small_m
}  // namespace reparam

// The plain-row formats (RowLoads, HalfFrag, PivotFrag); the standalone kernels and the host side (occupancy,
// the split plan, the launch and when this path applies) are in small_m_launch.cuh.
#include "small_m_plain_formats.cuh"
