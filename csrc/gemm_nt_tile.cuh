// A tensor-core tile engine for "NT" products C[P, Q] = A[P, L] * B[Q, L]^T in
// which both operands are contiguous along the reduction L (weights as A, the
// activations / intermediates as B). It is written as device functions that a
// persistent kernel calls for each work unit (P tile, Q tile, L range), so one
// launch can run several dependent products (see lowrank_linear.cu).
//
// - Tensor cores through WMMA 16x16x16 (fp16 / bf16 in, fp32 accumulate),
//   which compiles to mma.sync on sm_80 and sm_90.
// - Two-stage shared-memory pipeline fed by 16-byte cp.async when the operand
//   rows are 16-byte aligned; a bounds-checked scalar path otherwise, so odd
//   sizes (L, P, Q not multiples of anything) are correct.
// - Out-of-range rows and the part of the last L block beyond the unit's
//   L range are zero-filled, so partial units can be summed (split-L).
#pragma once

#include <mma.h>

#include "common.cuh"

namespace reparam {

// Tile shape: CTA tile BP x BQ x BL, warps laid out WP x WQ, 16x16 fragments.
template <int BP_, int BQ_, int BL_, int WP_, int WQ_>
struct TileCfg {
  static constexpr int BP = BP_, BQ = BQ_, BL = BL_, WP = WP_, WQ = WQ_;
  static constexpr int kThreads = WP * WQ * 32;
  static constexpr int FP = BP / WP / 16;  // fragments per warp along P
  static constexpr int FQ = BQ / WQ / 16;  // fragments per warp along Q
  static constexpr int LDS = BL + 8;       // padded smem row (elements): fewer bank conflicts, 16B aligned
  static_assert(FP >= 1 && FQ >= 1 && BL % 16 == 0, "bad tile config");
  template <class T>
  static constexpr int smem_bytes() {
    return 2 * (BP + BQ) * LDS * int(sizeof(T)) + WP * WQ * 256 * int(sizeof(float));
  }
};

// One operand: rows [0, rows) of a row-major matrix with leading dimension ld.
template <class S>
struct Operand {
  const S* ptr;
  int64_t rows, ld;
  bool vec;  // rows are 16-byte aligned and L % 8 == 0: cp.async path
};

// Loads rows [row0, row0+R) x cols [l0, l0+BL) of `op` into smem tile `dst`
// (R x LDS, element type T), zero-filling outside rows < op.rows, l < l_end.
template <class Cfg, int R, class T, class S>
__device__ __forceinline__ void load_tile(T* dst, const Operand<S>& op, int64_t row0, int64_t l0,
                                          int64_t l_end) {
  constexpr int CH = Cfg::BL / 8;  // 8-element chunks per row
  for (int c = threadIdx.x; c < R * CH; c += Cfg::kThreads) {
    const int r = c / CH, col = (c % CH) * 8;
    const int64_t gr = row0 + r, gl = l0 + col;
    T* d = dst + r * Cfg::LDS + col;
    if constexpr (sizeof(S) == sizeof(T)) {
      if (op.vec) {
        const bool ok = gr < op.rows && gl < l_end;  // l_end % 8 == 0 on this path
        cp_async16(d, ok ? static_cast<const void*>(op.ptr + gr * op.ld + gl) : op.ptr, ok ? 16 : 0);
        continue;
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool ok = gr < op.rows && gl + e < l_end;
      d[e] = from_f32<T>(ok ? to_f32<S>(op.ptr[gr * op.ld + gl + e]) : 0.f);
    }
  }
}

// One shared-memory stage of the MMA: acc += As (BP x BL) * Bs (BQ x BL)^T for
// this warp's fragments. Both tiles are row-major with leading dimension LDS.
template <class Cfg, class T>
__device__ __forceinline__ void mma_stage(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[Cfg::FP][Cfg::FQ],
    const T* As, const T* Bs) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, wp = warp / Cfg::WQ, wq = warp % Cfg::WQ;
#pragma unroll
  for (int kk = 0; kk < Cfg::BL; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[Cfg::FP];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[Cfg::FQ];
#pragma unroll
    for (int i = 0; i < Cfg::FP; ++i)
      wmma::load_matrix_sync(a[i], As + (wp * Cfg::FP + i) * 16 * Cfg::LDS + kk, Cfg::LDS);
#pragma unroll
    for (int j = 0; j < Cfg::FQ; ++j)
      wmma::load_matrix_sync(bf[j], Bs + (wq * Cfg::FQ + j) * 16 * Cfg::LDS + kk, Cfg::LDS);
#pragma unroll
    for (int i = 0; i < Cfg::FP; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::FQ; ++j) wmma::mma_sync(acc[i][j], a[i], bf[j], acc[i][j]);
  }
}

// Accumulates C tile (p0, q0) over L in [l_begin, l_end) into `acc`.
template <class Cfg, class T, class SB>
__device__ __forceinline__ void mma_unit(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[Cfg::FP][Cfg::FQ],
    T* smem, const Operand<T>& A, const Operand<SB>& B, int64_t p0, int64_t q0, int64_t l_begin,
    int64_t l_end) {
  using namespace nvcuda;
  T* As[2] = {smem, smem + Cfg::BP * Cfg::LDS};
  T* Bs[2] = {smem + 2 * Cfg::BP * Cfg::LDS, smem + 2 * Cfg::BP * Cfg::LDS + Cfg::BQ * Cfg::LDS};
#pragma unroll
  for (int i = 0; i < Cfg::FP; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::FQ; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nblk = (l_end - l_begin + Cfg::BL - 1) / Cfg::BL;
  load_tile<Cfg, Cfg::BP>(As[0], A, p0, l_begin, l_end);
  load_tile<Cfg, Cfg::BQ>(Bs[0], B, q0, l_begin, l_end);
  cp_async_commit();
  for (int64_t b = 0; b < nblk; ++b) {
    const int s = b & 1;
    if (b + 1 < nblk) {
      const int64_t ln = l_begin + (b + 1) * Cfg::BL;
      load_tile<Cfg, Cfg::BP>(As[s ^ 1], A, p0, ln, l_end);
      load_tile<Cfg, Cfg::BQ>(Bs[s ^ 1], B, q0, ln, l_end);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    mma_stage<Cfg>(acc, As[s], Bs[s]);
    __syncthreads();  // the next iteration overwrites the other stage only after all warps read it
  }
}

// Hands every in-range element (q, p, value) of the accumulators to `emit`.
// The staging buffer is this warp's 16x16 fp32 slice after the operand tiles.
template <class Cfg, class T, class Emit>
__device__ __forceinline__ void emit_unit(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[Cfg::FP][Cfg::FQ],
    T* smem, int64_t P, int64_t Q, int64_t p0, int64_t q0, Emit&& emit) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wp = warp / Cfg::WQ, wq = warp % Cfg::WQ;
  float* stage = reinterpret_cast<float*>(smem + 2 * (Cfg::BP + Cfg::BQ) * Cfg::LDS) + warp * 256;
#pragma unroll
  for (int i = 0; i < Cfg::FP; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::FQ; ++j) {
      // col-major store: stage[q_local * 16 + p_local], so lanes walk along P
      // and the output (row-major [Q, P]) is written in 16-element runs.
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_col_major);
      __syncwarp();
      const int64_t pb = p0 + (wp * Cfg::FP + i) * 16, qb = q0 + (wq * Cfg::FQ + j) * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t p = pb + (e % 16), q = qb + (e / 16);
        if (p < P && q < Q) emit(q, p, stage[e]);
      }
      __syncwarp();
    }
}

}  // namespace reparam
