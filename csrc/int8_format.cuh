// The int8 format's two decoders (layout: int8_linear.cu): Int8Dec for the general paths (quant_gemm.cuh)
// and Int8Frag for the small-M tensor-core loop (small_m_gemm.cuh); shared by int8_linear.cu and
// grouped_int8_linear.cu.
#pragma once

#include "quant_gemm.cuh"
#include "small_m_gemm.cuh"

namespace reparam {

template <class T>
struct Int8Dec {
  static constexpr int KC = 16;
  const uint8_t* q;
  const T* scales;
  int64_t K;
  bool vec;

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(q + n * K, k0, K, vec);
  }
  struct Params {
    float s;
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t /*k0*/) const { return {to_f32<T>(scales[n])}; }
  // Weights 8j .. 8j+7 of the chunk: bytes 8j .. 8j+7 = words 2j, 2j+1.
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t lo = j == 0 ? raw.x : raw.z, hi = j == 0 ? raw.y : raw.w;
    // ^ 0x80 maps int8 q to the unsigned byte q + 128.
    const uint32_t words[2] = {lo ^ 0x80808080u, hi ^ 0x80808080u};
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = (quant::byte_to_float(words[i / 4], i % 4) - 128.f) * p.s;
  }
};

// The small-M tensor-core path's view of the same weights (small_m_gemm.cuh).
// A lane's 16-byte load is 16 consecutive k of one row: word s = k kt + 4s .. +3.
// Step s = 2i + h of lane t maps its mma k-slots 2t, 2t + 1, 2t + 8, 2t + 9 to
// kt + 4s + 0, 1, 2, 3, so x's registers are plain words of its 16-byte vector
// x[kt + 8i .. +8). The scale is per output channel, so the mma runs on the exact
// integer codes and the epilogue multiplies by s[n]. Codes become values with
// ^ 0x80 (int8 q -> byte q + 128) and, for fp16, one byte permute into
// 0x64 | byte (= 1024 + q + 128) and one subtract of 1152 per pair; bf16 has too
// few mantissa bits for that, so its codes go through fp32 (2^23 + byte) and one
// pair conversion.
template <class T>
struct Int8Frag : small_m::RowLoads<uint8_t> {  // the codes, rows of K bytes
  static constexpr int kLaneK = 16;
  static constexpr bool kPlainX = true;  // A = a_consecutive of x: loaded word by word
  const T* scales;

  __device__ __forceinline__ void b(const Chunk& c, int i, int h, uint32_t& b0, uint32_t& b1) const {
    const uint32_t u = small_m::word(c.q, 2 * i + h) ^ 0x80808080u;  // bytes q + 128
    if constexpr (std::is_same<T, __half>::value) {
      b0 = small_m::Pair<T>::sub(__byte_perm(u, 0x64646464u, 0x4140), 0x64806480u);
      b1 = small_m::Pair<T>::sub(__byte_perm(u, 0x64646464u, 0x4342), 0x64806480u);
    } else {  // byte j as the fp32 2^23 + q + 128, minus 2^23 + 128: exactly q
      auto code = [u](int j) { return __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + j)) - 8388736.f; };
      b0 = small_m::Pair<T>::pack2(code(0), code(1));
      b1 = small_m::Pair<T>::pack2(code(2), code(3));
    }
  }
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    small_m::a_consecutive(r0, r1, h, a);
  }
  __device__ __forceinline__ float out_scale(int64_t n) const { return to_f32<T>(scales[n]); }
};

}  // namespace reparam
