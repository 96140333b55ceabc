// The 4-bit lookup-table format's two decoders (layout: lut_linear.cu): LutDec for the general paths
// (quant_gemm.cuh) and LutFrag for the small-M tensor-core loop (small_m_gemm.cuh) and the wgmma loop
// (quant_wgmma.cuh); shared by lut_linear.cu and grouped_lut_linear.cu.
#pragma once

#include "quant_gemm.cuh"
#include "small_m_gemm.cuh"

namespace reparam {

template <class T>
struct LutDec {
  static constexpr int KC = 32;
  const uint8_t* codes;
  const T* lut;
  int64_t K, rows_per_table;
  bool vec;

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(codes + n * (K / 2), k0 / 2, K / 2, vec);
  }
  struct Params {
    const T* tab;
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t /*k0*/) const {
    return {lut + (n / rows_per_table) * 16};
  }
  // Weights 8j .. 8j+7 of the chunk = word j; byte b holds weights 2b (low nibble), 2b + 1.
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t word = j == 0 ? raw.x : j == 1 ? raw.y : j == 2 ? raw.z : raw.w;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (word >> (8 * b)) & 0xFFu;
      w[2 * b] = to_f32<T>(p.tab[byte & 15u]);
      w[2 * b + 1] = to_f32<T>(p.tab[byte >> 4]);
    }
  }
};

// The small-M tensor-core path's view of the same codes (small_m_gemm.cuh). A lane's 16-byte load is
// 32 consecutive k of one row: word i holds nibbles k = kt + 8i + 0..7. The row's 16-entry table
// lives in 8 registers for the whole work unit: lo[c] / hi[c] = the low / high bytes of entries
// 4c .. 4c+3. For 4 nibbles q0..q3 (16 bits w of a word), one byte permute per 8-entry half picks
// the candidates (selector nibbles q & 7), a third picks between the halves by bit 3 of each q, the
// same for the high bytes, and two more interleave them into the B registers: entries (q0, q1) for
// k, k+1 and (q2, q3) for k+2, k+3 (x: the consecutive slot map of int8). ~2.75 ops per weight.
template <class T>
struct LutFrag {
  static constexpr int kLaneK = 32;
  static constexpr bool kPlainX = true;  // A = a_consecutive of x: loaded word by word
  const uint8_t* codes;
  const T* lut;
  int64_t K, rows_per_table;

  struct Chunk {
    uint4 q;
  };
  struct RowState {
    uint32_t lo[4], hi[4];
  };
  struct Row {
    uint32_t off;  // n * K / 2 (N * K < 2^32: small_m::rows_fit32, checked by the host)
  };
  __device__ __forceinline__ Row row(int64_t n) const { return {uint32_t(n) * uint32_t(K / 2)}; }
  __device__ __forceinline__ const void* at(const Row& r, uint32_t kt) const { return codes + (r.off + (kt >> 1)); }
  __device__ __forceinline__ Chunk load(const Row& r, uint32_t kt) const {
    return {__ldg(reinterpret_cast<const uint4*>(at(r, kt)))};
  }
  __device__ __forceinline__ Chunk load(int64_t n, int64_t kt) const { return load(row(n), uint32_t(kt)); }
  static __device__ __forceinline__ Chunk zero() { return {make_uint4(0u, 0u, 0u, 0u)}; }
  __device__ __forceinline__ RowState row_state(int64_t n) const {
    const uint4* row = reinterpret_cast<const uint4*>(lut + (n / rows_per_table) * 16);  // 32 bytes
    const uint4 a = __ldg(row), b = __ldg(row + 1);
    const uint32_t t[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};  // word j = entries 2j, 2j + 1
    RowState s;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      s.lo[c] = __byte_perm(t[2 * c], t[2 * c + 1], 0x6420);
      s.hi[c] = __byte_perm(t[2 * c], t[2 * c + 1], 0x7531);
    }
    return s;
  }
  __device__ __forceinline__ void b(const Chunk& c, const RowState& s, int i, int h, uint32_t& b0,
                                    uint32_t& b1) const {
    // Selectors for the word's 8 nibbles at once, then step h's four (k = kt + 8i + 4h + 0..3) moved to
    // the low 16 bits, which are all PRMT reads: 5 instructions per word (per step: 4 + 1 mask).
    const uint32_t w = small_m::word(c.q, i);
    // (and_or: opaque to the compiler, which would otherwise mask each half separately)
    const uint32_t sel = small_m::and_or(w, 0x77777777u, 0u) >> (16 * h);
    const uint32_t pick = small_m::and_or(w >> 1, 0x44444444u, 0x32103210u) >> (16 * h);
    using small_m::prmt;
    const uint32_t lo = prmt(prmt(s.lo[0], s.lo[1], sel), prmt(s.lo[2], s.lo[3], sel), pick);
    const uint32_t hi = prmt(prmt(s.hi[0], s.hi[1], sel), prmt(s.hi[2], s.hi[3], sel), pick);
    b0 = __byte_perm(lo, hi, 0x5140);
    b1 = __byte_perm(lo, hi, 0x7362);
  }
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    small_m::a_consecutive(r0, r1, h, a);
  }
  __device__ __forceinline__ float out_scale(int64_t) const { return 1.f; }
};

}  // namespace reparam
