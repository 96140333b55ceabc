// Register-level helpers of the small-M loop (small_m_gemm.cuh) and its formats: words of a 16-byte
// vector, one-instruction bit tricks written as inline PTX (the compiler spends two instructions or a
// mask on them otherwise), 16-bit loads, and packed half2 / bfloat162 arithmetic with the mma.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace reparam {
namespace small_m {

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// (w & mask) | c as one LOP3: written out, the compiler emits an AND and an OR (a LOP3 takes one
// immediate). Half the decode of an int4 pair.
__device__ __forceinline__ uint32_t and_or(uint32_t w, uint32_t mask, uint32_t c) {
#ifdef REPARAM_CPU_CUDA
  return (w & mask) | c;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(w), "r"(mask), "r"(c));
  return d;
#endif
}

// v, with where it came from hidden from the compiler: left to itself it recomputes a work unit's row
// offsets from the thread index inside the main loop (~10 instructions per stage, at any register
// count) instead of keeping them in registers; hidden, it keeps them (int4 M <= 8: 324 -> 314).
__device__ __forceinline__ void keep_in_register(uint32_t& v) {
#ifndef REPARAM_CPU_CUDA
  asm volatile("" : "+r"(v));
#endif
}

// PRMT with a selector whose nibbles have bit 3 clear (no sign-replicate mode): __byte_perm masks
// its selector to 3 bits per nibble, one LOP3 per call when the compiler cannot see the bits are
// clear (selectors built by and_or). LutFrag's table lookups.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
#ifdef REPARAM_CPU_CUDA
  return __byte_perm(a, b, s);
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
#endif
}

// The 16-bit value at p, zero-extended (a T's bits), and a 16-bit value in both halves of a word (a
// half2 / bfloat162 (v, v)): one load, one permute. Kept apart so that a Frag's load() only loads and
// the permute waits for the use (below).
template <class T>
__device__ __forceinline__ uint32_t load16(const T* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ uint32_t dup16(uint32_t v) { return __byte_perm(v, 0u, 0x1010); }

// Packed-pair arithmetic on the bits of a half2 / bfloat162, and the mma.
template <class T>
struct Pair {
  static constexpr bool kHalf = std::is_same<T, __half>::value;
  using V = std::conditional_t<kHalf, __half2, __nv_bfloat162>;
  static __device__ __forceinline__ uint32_t bits(const V& v) { return *reinterpret_cast<const uint32_t*>(&v); }
  static __device__ __forceinline__ const V& val(const uint32_t& u) { return *reinterpret_cast<const V*>(&u); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (kHalf) return bits(__floats2half2_rn(lo, hi));
    else return bits(__floats2bfloat162_rn(lo, hi));
  }
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) { return bits(__hsub2(val(a), val(b))); }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) { return bits(__hmul2(val(a), val(b))); }
  static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return bits(__hfma2(val(a), val(b), val(c)));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef REPARAM_CPU_CUDA  // the CPU execution harness (python_tests/cuda_on_cpu) computes it from all 32 lanes
    ::rk_cpu::mma_m16n8k16(d, a, b0, b1, kHalf, __FILE__, __LINE__);
#else
    if constexpr (kHalf) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
  }
};

}  // namespace small_m
}  // namespace reparam
