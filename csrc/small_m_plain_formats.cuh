// The plain-row formats of the small-M loop (small_m_gemm.cuh): x's consecutive slot map, 16-byte
// loads of plain rows (RowLoads: int8's codes, fp16 / bf16 factor rows), HalfFrag and PivotFrag
// (the low-rank ops' factors). Included at the end of small_m_gemm.cuh.
#pragma once

#include "small_m_gemm.cuh"

namespace reparam {
namespace small_m {

// The A operand of step h for formats whose slots 2t, 2t + 1, 2t + 8, 2t + 9 are k = kt + 4h + 0..3
// (8 k per step pair): (x[4h], x[4h + 1]) and (x[4h + 2], x[4h + 3]) are plain words of x's vectors.
__device__ __forceinline__ void a_consecutive(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
  a[0] = word(r0, 2 * h);
  a[1] = word(r1, 2 * h);
  a[2] = word(r0, 2 * h + 1);
  a[3] = word(r1, 2 * h + 1);
}

// Plain fp16 / bf16 weights W [N, K] (K % 8 == 0, rows 16-byte aligned): a lane's 16-byte load is
// 8 consecutive k of one row, word s = k kt + 2s, +1. Step h maps the mma k-slots 2t, 2t + 1,
// 2t + 8, 2t + 9 to kt + 4h + 0, 1, 2, 3, so both operands are plain words: no decode at all.
// 16-byte loads of rows of E (element stride K) as chunks: the plain-layout part of a Frag.
// A Frag's Row holds what row(n) resolves once per work unit (the row's 32-bit element offset), so
// that a stage's load(row, kt) is an add and a load; load(n, kt) does both (the wgmma path).
template <class E>
struct RowLoads {
  const E* w;
  int64_t K;
  struct Chunk {
    uint4 q;
  };
  struct Row {
    uint32_t off;  // n * K elements (N * K < 2^32: rows_fit32)
  };
  __device__ __forceinline__ Row row(int64_t n) const { return {uint32_t(n) * uint32_t(K)}; }
  __device__ __forceinline__ const void* at(const Row& r, uint32_t kt) const { return w + (r.off + kt); }
  __device__ __forceinline__ Chunk load(const Row& r, uint32_t kt) const {
    return {__ldg(reinterpret_cast<const uint4*>(at(r, kt)))};
  }
  __device__ __forceinline__ Chunk load(int64_t n, int64_t kt) const { return load(row(n), uint32_t(kt)); }
  static __device__ __forceinline__ Chunk zero() { return {make_uint4(0u, 0u, 0u, 0u)}; }
};

template <class T>
struct HalfFrag : RowLoads<T> {
  static constexpr int kLaneK = 8;
  static constexpr bool kPlainX = true;  // A = a_consecutive of x: loaded word by word (PivotFrag gathers)
  using typename RowLoads<T>::Chunk;
  __device__ __forceinline__ void b(const Chunk& c, int /*i*/, int h, uint32_t& b0, uint32_t& b1) const {
    b0 = word(c.q, 2 * h);
    b1 = word(c.q, 2 * h + 1);
  }
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    a_consecutive(r0, r1, h, a);
  }
  __device__ __forceinline__ float out_scale(int64_t) const { return 1.f; }
};

// Column c of a perm kept inside [0, K) in 32 bits (K < 2^30): a bad perm gives wrong numbers, never a read
// outside x. One instruction, so the gather pays it per column.
__device__ __forceinline__ uint32_t col_inside(int64_t c, int64_t K) { return min(uint32_t(c), uint32_t(K - 1)); }

// The first product of pivoted low-rank factors, t = x[:, perm[:r]] + x[:, perm[r:]] @ w^T, with
// w [r, K - r] as HalfFrag weights ((K - r) % 8 == 0): the A operand is gathered from x through perm
// (8 scalar loads per vector; x is small at M <= 64 and stays in L1/L2), and the pivot columns are
// added in the epilogue. x is read-only in the launch. The loop reads a step pair's 8 columns once
// (gather_cols) for all the x rows a lane gathers (gather); a column outside [0, Kx) is read as
// one inside (a bad perm: wrong numbers, never a read outside x).
template <class T>
struct PivotFrag : HalfFrag<T> {
  const T* xin;          // [M, Kx]
  const int64_t* perm;   // [Kx], pivots first
  int64_t Kx, r;
  struct Cols {
    uint32_t c[8];
  };
  // x's columns of reduction offsets k .. k + 8 (non-pivot columns perm[r + k ..]), 32-bit (Kx < 2^30)
  __device__ __forceinline__ Cols gather_cols(int64_t k) const {
    Cols cols;
#pragma unroll
    for (int e = 0; e < 8; ++e) cols.c[e] = col_inside(__ldg(perm + r + k + e), Kx);
    return cols;
  }
  __device__ __forceinline__ uint4 gather(int m, const Cols& cols) const {
    uint32_t w[4];
    const T* row = xin + uint64_t(uint32_t(m)) * uint32_t(Kx);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const T lo = __ldg(row + cols.c[2 * e]), hi = __ldg(row + cols.c[2 * e + 1]);
      w[e] = uint32_t(*reinterpret_cast<const uint16_t*>(&lo)) | (uint32_t(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  __device__ __forceinline__ uint4 gather_x(int m, int64_t k) const { return gather(m, gather_cols(k)); }
  __device__ __forceinline__ float out_add(int m, int64_t n) const {
    return to_f32<T>(__ldg(xin + int64_t(m) * Kx + col_inside(__ldg(perm + n), Kx)));
  }
};

}  // namespace small_m
}  // namespace reparam

// The host side: occupancy, the split plan, the launch and when this path applies.
#include "small_m_launch.cuh"
