// The small-M path's shapes and what a launch hands its loop (small_m_gemm.cuh): the CTA's warps, the
// register cap, the shared-memory rings' layout, and Problem, one GEMM and how its work is cut.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "small_m_frag_traits.cuh"

namespace reparam {
namespace small_m {

constexpr int kWarpsN = 4, kWarpsK = 2, kThreads = 32 * kWarpsN * kWarpsK;
constexpr int kMaxM = 64;
constexpr int64_t kMaxK = int64_t(1) << 30;  // k offsets are 32-bit in the kernels (Frag::load)
// and a weight row is a 32-bit offset (Frag::row): rows * row length < 2^32, rows < 2^31
inline bool rows_fit32(int64_t rows, int64_t row_len) {
  return rows < (int64_t(1) << 31) && rows * row_len < (int64_t(1) << 32);
}

// The weights' shared-memory ring (REPARAM_SMALL_M_RING=1): each thread copies its chunks kRingStages - 1
// stages ahead by cp.async into its own slots, [stage][j][thread] 16 bytes each (a warp's 32 slots are
// 512 consecutive bytes: no conflict), and reads back only what it copied (cp.async.wait_group, no
// barrier). Registers hold one stage ahead (32 KB of weights per SM at M <= 16), the ring three (96 KB).
constexpr int kRingStages = 4;
template <int NG>
constexpr int ring_bytes() {
  return kRingStages * NG * kThreads * 16;
}

// With REPARAM_SMALL_M_RING=2 the ring also carries x, for the tiles with x as the A operand (MT >= 1)
// of the quantized formats (kLaneK 16 or 32; not gathered). The 4 N-warps of a K-warp (a warpgroup)
// read the same x rows; from L1 each took ~128 (int4) to ~512 (lut) wavefronts a stage, as much L1
// time as the weights' DRAM time at M >= 16 (docs/benchmarks.md, "A second count"). In the ring the
// warpgroup copies the tile once, whole lines, and each warp reads it back as 16-byte vectors,
// conflict-free (x_unit); one barrier of the warpgroup a stage orders copies and reads.
template <class Frag, int MT>
constexpr bool x_fits_ring() {
  return MT >= 1 && !gathers_x<Frag>::value && (Frag::kLaneK == 16 || Frag::kLaneK == 32);
}
// Where 16-byte unit u of x row r sits in its row of U = 4 kLaneK / 8 units (16 or 8): a lane reads unit
// kLaneK / 8 t + i of rows g and g + 8, so the 8 lanes of a quarter-warp (t = 0..3, two rows g) read 4
// units of each of two rows that 128-byte row strides put on the same banks; the XOR spreads them over
// the 8 bank groups (U = 16: bits 0-1 by (t >> 1, g & 1); U = 8: bit 0 by g & 1). Writers (the copy:
// consecutive u of one row per quarter-warp) see a permutation of 8 units.
template <int U>
__device__ __forceinline__ int x_unit(int u, int r) {
  static_assert(U == 8 || U == 16, "rows of 8 or 16 units");
  return U == 16 ? u ^ ((u >> 3) | ((r & 1) << 1)) : u ^ (r & 1);
}
template <class Frag, class T, int MT>
constexpr int x_ring_bytes() {
  return kRingStages * kWarpsK * 16 * MT * 4 * Frag::kLaneK * int(sizeof(T));
}

// One GEMM of this path and how its work is cut: `columns` blocks of BN output
// rows times `splits` ranges of K (kchunk each, a multiple of the CTA stage).
template <class Frag, class T>
struct Problem {
  Frag frag;
  const T* x;  // [M, K], 16-byte aligned rows
  const T* bias;
  T* y;                // [M, N]
  float* part;         // [splits, M, N] fp32 partials when splits > 1
  unsigned* counters;  // [columns], zero at rest (split_k_counters.h), when splits > 1
  int M;
  int64_t N, K, kchunk, columns, splits;
  // (Until session 37 an int l2_ahead here prefetched the weights d stages ahead into L2,
  // REPARAM_SMALL_M_L2_AHEAD: H200 run 3 timed d = 2 and 4 at M = 1, 16 and 64 in every format and none
  // beat d = 0 — int4 M = 1 20.0 / 20.4 against 19.0 us — while its bookkeeping cost the loop 8
  // instructions a stage when off: removed.)
  // The format's row of this problem's output 0: 0, or e * N for expert e of a grouped launch (the
  // experts' weights one [E * N, ...] stack; grouped_quant.cuh). Read at setup and in the epilogue only.
  uint32_t row_base = 0;
  // x of the next stage prefetched into L1 as a stage starts computing, a stage before the mmas read it
  // (REPARAM_SMALL_M_X_AHEAD=1; the standalone kernels' register loop, x not gathered). Without it every
  // stage begins with an L2 round trip for x: a CTA's stages read fresh x, and its four N-warps miss L1
  // together (the SASS: the first mma of a stage waits on x's loads issued ~36 instructions before it).
  // A hint: no register, no wait.
  int x_ahead = 0;
  // Stream-K (REPARAM_SMALL_M_STREAM_K=1; the standalone kernels, run_cta): > 0, the CTAs of a 1-D grid
  // that share the columns x ceil(K / kUnitK) stages evenly (p.splits: then the most pieces a column
  // block can have, the partials' slots); 0, the even split's (columns, splits) grid.
  int64_t stream = 0;
};

// CTAs per SM the kernel is compiled for (its register cap: 2 -> 128 registers). Decode lives on the
// weight loads in flight, so two CTAs wherever they fit without spills (ptxas, sm_90a): every format
// at M <= 16, and int8 / fp16 rows (kLaneK <= 16) at M <= 32. Left to itself ptxas took 130-134
// registers for int8 at M <= 16 and 156-158 at M <= 32 (one CTA per SM); int4 and lut at M <= 32
// spill 48-200 bytes under the cap, int8 at M <= 16 spills under a cap of three CTAs.
template <class Frag, int MT>
constexpr int ctas_per_sm() {
  return MT <= 1 || (MT == 2 && Frag::kLaneK <= 16) ? 2 : 1;
}

// Whether x's 16-byte loads take the vector offset 8 i as an immediate (xrow + kt held per stage,
// one add per load fewer) or add kt + 8 i per load (fewer registers live). Folded everywhere but at
// two CTAs per SM with more than one m16 tile (int8 at M <= 32), which it makes spill (ptxas, sm_90a).
template <class Frag, int MT>
constexpr bool fold_x_offsets() {
  return MT <= 1 || ctas_per_sm<Frag, MT>() == 1;
}

}  // namespace small_m
}  // namespace reparam
