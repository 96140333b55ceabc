// The int4 format's two decoders (layout: int4_linear.cu): Int4Dec for the general paths (quant_gemm.cuh)
// and Int4Frag for the small-M tensor-core loop (small_m_gemm.cuh); shared by int4_linear.cu and
// grouped_int4_linear.cu.
#pragma once

#include "quant_gemm.cuh"
#include "small_m_gemm.cuh"

namespace reparam {

template <class T>
struct Int4Dec {
  static constexpr int KC = 32;
  const uint8_t* q;
  const T* scales;
  const T* zeros;
  int64_t K, G, group;
  bool vec;
  int group_shift;  // log2(group) when it is a power of two (a shift, not a ~20-70 instruction division), else -1

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(q + n * (K / 2), k0 / 2, K / 2, vec);
  }
  struct Params {
    float s, zs;  // (q - z) * s = q * s + zs: one FMA per weight
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t k0) const {
    const int64_t g = n * G + (group_shift >= 0 ? k0 >> group_shift : k0 / group);
    const float s = to_f32<T>(scales[g]);
    return {s, -to_f32<T>(zeros[g]) * s};
  }
  // Weights 8j .. 8j+7 of the chunk = bytes 4j .. 4j+3 = word j; byte b of the word
  // holds weight 2b (low nibble) and 2b + 1 (high nibble).
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t word = j == 0 ? raw.x : j == 1 ? raw.y : j == 2 ? raw.z : raw.w;
    const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      w[2 * b] = fmaf(quant::byte_to_float(lo, b), p.s, p.zs);
      w[2 * b + 1] = fmaf(quant::byte_to_float(hi, b), p.s, p.zs);
    }
  }
};

// The small-M tensor-core path's view of the same weights (small_m_gemm.cuh).
// A lane's 16-byte load is 32 consecutive k of one row: words i = 0..3, each 8
// nibbles k = kt + 8i + 0..7. One mask gives the pair (nibble j, nibble j + 4)
// of a word, so step s = 2i + h of lane t (= lane % 4) maps its mma k-slots to
//   slot 2t -> kt + 8i + 2h,        slot 2t + 1 -> kt + 8i + 2h + 4,
//   slot 2t + 8 -> kt + 8i + 2h + 1, slot 2t + 9 -> kt + 8i + 2h + 5,
// and x gets the same map from its 16-byte vector x[kt + 8i .. +8) by two byte
// permutes per register. A nibble pair becomes weights with one mask-and-or
// (0x6400 | q is the fp16 1024 + q, 0x4300 | q the bf16 128 + q), one subtract
// of the magic (exact) and one FMA: (q - z) * s = q * s + (-z * s). Three
// instructions per pair, plus one shift per word (fp16; bf16: three).
inline int ilog2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

template <class T>
struct Int4Frag {
  static constexpr int kLaneK = 32;
  static constexpr bool kHalf = std::is_same<T, __half>::value;
  static constexpr uint32_t kMagic = kHalf ? 0x64006400u : 0x43004300u;
  const uint8_t* q;
  const T* scales;
  const T* zeros;
  int64_t K;
  int group_shift;  // log2(group_size): a division here would cost ~20-70 instructions per load

  // load() only loads: the scale and zero stay raw (16-bit T bits) until b() uses them. When load()
  // also built (s, s) and (-z s, -z s), those instructions sat inside the prefetch's branch, right
  // after its loads, so every stage waited there a full memory round trip for the next stage's
  // scales before computing this one (seen in the SASS after the first H200 run measured 2.2 TB/s
  // at M = 1): the prefetch hid nothing. In b() the same instructions run once per stage (the eight
  // b() calls of a chunk share them: common subexpressions in one unrolled block).
  struct Chunk {
    uint4 q;
    uint32_t s, z;  // the group's scale and zero point, T bits in the low half
  };
  // A row is one 32-bit byte offset (N * K < 2^32: small_m::rows_fit32, checked by the host):
  // registers are what limits this loop (at 128 a CTA pair fits an SM; past it the compiler
  // recomputes rows per stage; one register per row instead of three was part of taking the M <= 16
  // loop from 424 to 370 instructions per stage, docs/benchmarks.md). The chunk's scale index follows from its byte offset o = n K / 2 + kt / 2: with
  // K / 2 = G * group / 2, o >> (log2(group) - 1) = n G + kt / group.
  struct Row {
    uint32_t off;  // n * K / 2
  };
  __device__ __forceinline__ Row row(int64_t n) const { return {uint32_t(n) * uint32_t(K / 2)}; }
  // (the scales share a line per 64 groups: no prefetch needed for them)
  __device__ __forceinline__ const void* at(const Row& r, uint32_t kt) const { return q + (r.off + (kt >> 1)); }
  // The chunk's scale and zero point without its 16 bytes (q = 0): what the small-M loop's
  // shared-memory ring keeps in registers (small_m::has_side).
  __device__ __forceinline__ Chunk side(const Row& r, uint32_t kt) const {
    const uint32_t gi = (r.off + (kt >> 1)) >> (group_shift - 1);  // group % 32 == 0: one group per lane block
    return {make_uint4(0u, 0u, 0u, 0u), small_m::load16(scales + gi), small_m::load16(zeros + gi)};
  }
  __device__ __forceinline__ Chunk load(const Row& r, uint32_t kt) const {
    Chunk c = side(r, kt);
    c.q = __ldg(reinterpret_cast<const uint4*>(at(r, kt)));
    return c;
  }
  __device__ __forceinline__ Chunk load(int64_t n, int64_t kt) const { return load(row(n), uint32_t(kt)); }
  static __device__ __forceinline__ Chunk zero() { return {make_uint4(0u, 0u, 0u, 0u), 0u, 0u}; }
  // The weight pair of nibbles (j, j + 4) of w, j = 0 (hi = false) or 1 (hi = true); the caller
  // shifts w by 8 for j = 2, 3. (w & mask) | magic is one LOP3 (the compiler spends two on it).
  __device__ __forceinline__ uint32_t pair(uint32_t w, bool hi, uint32_t s2, uint32_t nzs2) const {
    using P = small_m::Pair<T>;
    uint32_t q;
    if (!hi) {
      q = P::sub(small_m::and_or(w, 0x000F000Fu, kMagic), kMagic);
    } else if constexpr (kHalf) {
      // fp16 1024 + 16 q taken in place (no shift), then (1024 + 16 q) / 16 - 64 = q, exact.
      q = P::fma(small_m::and_or(w, 0x00F000F0u, kMagic), 0x2C002C00u /* 1/16 */, 0xD400D400u /* -64 */);
    } else {
      // bf16 has 7 fraction bits: 16 q does not fit under 128's exponent, so shift.
      q = P::sub(small_m::and_or(w >> 4, 0x000F000Fu, kMagic), kMagic);
    }
    return P::fma(q, s2, nzs2);
  }
  __device__ __forceinline__ void b(const Chunk& c, int i, int h, uint32_t& b0, uint32_t& b1) const {
    using P = small_m::Pair<T>;
    // (s, s) by one byte permute; -z * s by one packed multiply: rounded once, as the fp32 product
    // of two T values (exact) rounded to T would be.
    const uint32_t s2 = small_m::dup16(c.s), nzs2 = P::mul(small_m::dup16(c.z) ^ 0x80008000u, s2);
    const uint32_t w = small_m::word(c.q, i) >> (8 * h);
    b0 = pair(w, false, s2, nzs2);  // nibbles 2h, 2h + 4
    b1 = pair(w, true, s2, nzs2);   // nibbles 2h + 1, 2h + 5
  }
  // (x[2h], x[2h + 4]) for slots 2t, 2t + 1 and (x[2h + 1], x[2h + 5]) for slots 2t + 8, 2t + 9.
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    using small_m::word;
    a[0] = __byte_perm(word(r0, h), word(r0, h + 2), 0x5410);
    a[1] = __byte_perm(word(r1, h), word(r1, h + 2), 0x5410);
    a[2] = __byte_perm(word(r0, h), word(r0, h + 2), 0x7632);
    a[3] = __byte_perm(word(r1, h), word(r1, h + 2), 0x7632);
  }
  __device__ __forceinline__ float out_scale(int64_t) const { return 1.f; }
};

// Int4Frag with the scales applied after the mma (REPARAM_SMALL_M_POST_SCALE=1, the transposed tile at
// M <= 8, groups of a multiple of 128: small_m::linear_small_m_transposed). Int4Frag spends three
// instructions on a weight pair (mask-and-or, subtract the magic, FMA with the scale): 96 HFMA2 + 32 HADD2 +
// 64 LOP3 of its 318 a stage (int4 fp16, sm_90a). Here the mma takes the pair as the mask-and-or leaves it,
// (1024 + q) in fp16, (1024 + 16 q) for the high nibble (bf16: 128 + q, the high nibble shifted), and
// x's high-nibble slots are divided by 16 (exact: a power of two), so a stage's mmas sum
//   D = sum_k q_k x_k + 1024 * sum_k b_k,      b_k the x value as the mma sees it (x or x / 16),
// in fp32 (products of two 16-bit floats are exact in it). One more mma of the same x against a constant A
// gives, per x row, O = 1024 * sum b (A rows g: the magic) and X = sum x (A rows g + 8: 1 for the low
// slots, 16 for the high), so the stage adds (D - O - z X) * s to the row's sum in fp32: (q - z) * s never
// rounds to 16 bits. A warp's stage is 128 consecutive k (4 lanes x 32) starting at a multiple of 128,
// so with group % 128 == 0 it lies in one group (one s, z for each of the lane's rows), and K % 128 == 0
// makes a stage wholly inside or past the range. D - O cancels: O is ~1024 / 7.5 times a group's sum of
// |q x| (codes average 7.5), so ~7 of fp32's 24 bits go, an error ~1e-5 of |x| |W|: far under the tests' 5e-3.
template <class T>
struct Int4PostFrag : Int4Frag<T> {
  using Base = Int4Frag<T>;
  using Chunk = typename Base::Chunk;
  using Base::kHalf;
  using Base::kMagic;
  static constexpr bool kPostScale = true;
  // The raw pairs of step 2i + h: one LOP3 each (bf16's high nibble: a shift first).
  __device__ __forceinline__ void b(const Chunk& c, int i, int h, uint32_t& b0, uint32_t& b1) const {
    const uint32_t w = small_m::word(c.q, i) >> (8 * h);
    b0 = small_m::and_or(w, 0x000F000Fu, kMagic);                             // 1024 + q (bf16: 128 + q)
    if constexpr (kHalf) b1 = small_m::and_or(w, 0x00F000F0u, kMagic);       // 1024 + 16 q
    else b1 = small_m::and_or(w >> 4, 0x000F000Fu, kMagic);                  // 128 + q
  }
  // Int4Frag's x pairs, the high-nibble slots (a[2], a[3]) divided by 16 in fp16.
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    Base::a(r0, r1, h, a);
    if constexpr (kHalf) {
      a[2] = small_m::Pair<T>::mul(a[2], 0x2C002C00u);  // 1/16
      a[3] = small_m::Pair<T>::mul(a[3], 0x2C002C00u);
    }
  }
  // The constant A of the sums' mma: rows g the magic (O), rows g + 8 what makes X = sum x.
  static __device__ __forceinline__ void ones(uint32_t (&o)[4]) {
    o[0] = kMagic;                             // row g, low slots
    o[2] = kMagic;                             // row g, high slots
    o[1] = kHalf ? 0x3C003C00u : 0x3F803F80u;  // row g + 8, low slots: 1
    o[3] = kHalf ? 0x4C004C00u : 0x3F803F80u;  // row g + 8, high slots: 16 (fp16: b = x / 16), bf16 1
  }
  static __device__ __forceinline__ float f32(uint32_t bits) {
    const unsigned short u = static_cast<unsigned short>(bits);
    return to_f32<T>(*reinterpret_cast<const T*>(&u));
  }
  // acc (the transposed tile's accumulators: weight rows of chunks lo (c 0, 1) and hi (c 2, 3), x rows 2t,
  // 2t + 1) += (d - O - z X) * s, from the stage's mma sums d and the sums' mma o (c 0, 1: O; c 2, 3: X).
  static __device__ __forceinline__ void post(const Chunk& lo, const Chunk& hi, const float (&d)[4],
                                              const float (&o)[4], float (&acc)[4]) {
    const float s0 = f32(lo.s), z0 = f32(lo.z), s1 = f32(hi.s), z1 = f32(hi.z);
    acc[0] = fmaf(s0, fmaf(-z0, o[2], d[0] - o[0]), acc[0]);
    acc[1] = fmaf(s0, fmaf(-z0, o[3], d[1] - o[1]), acc[1]);
    acc[2] = fmaf(s1, fmaf(-z1, o[2], d[2] - o[0]), acc[2]);
    acc[3] = fmaf(s1, fmaf(-z1, o[3], d[3] - o[1]), acc[3]);
  }
};

}  // namespace reparam
