// CUDA on the CPU: enough of the CUDA language, runtime and device library to compile the
// project's real kernel sources (csrc/) with g++ and run them on host memory, so the kernels'
// own code (index math, bit tricks, barriers, split-K fixups, host launch planning) is executed
// and checked against float64 on a machine without a GPU. A test tool, not a backend.
//
// Model:
//  - every CUDA thread is a fiber (ucontext) with its own 256 KB stack (overflow detected by a
//    canary at its bottom); the threads of a block run on one
//    OS thread, which switches fibers only at barriers and warp collectives (so `__shared__`
//    variables are `static thread_local`: one copy per OS thread = per running block);
//  - __syncthreads / __syncwarp / warp collectives wait until every live thread of the block /
//    warp has arrived, and all of them must have arrived at the same call site (file:line), else
//    the run fails with a "divergent barrier" error; a block in which no thread can move fails as
//    a deadlock; a warp collective with an exited lane fails;
//  - mma.sync m16n8k16 and WMMA 16x16x16 are computed from the fragments of all 32 lanes with the
//    PTX / an arbitrary-but-fixed WMMA element layout (products exact, sums in double);
//  - cp.async copies land in shared memory only at cp.async.wait_group (a read before the wait
//    sees the stale data), or with RK_CPU_CP_ASYNC_EARLY=1 at once (a buffer refilled while others
//    still read it shows);
//  - blocks of a normal launch run in a shuffled order, several at a time on OS threads (split-K
//    arrival counters see real concurrency); a cooperative launch runs all blocks at once, with
//    grid.sync() a barrier across them;
//  - tensors live in their own mappings with inaccessible pages around them: an access past
//    either end is a segfault (the runner reports the block / thread / op), and fresh tensors are
//    filled with 0xFF bytes (NaN) so unwritten outputs show.
// Not modelled: timing, memory-model reorderings beyond what x86 does, bank conflicts,
// register limits, __launch_bounds__.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define REPARAM_CPU_CUDA 1

// ------------------------------------------------------------------ vector types

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ------------------------------------------------------------------ fp16 / bf16

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace rk_cpu {
// v rounded to nearest even in a binary format with `mbits` fraction bits and `ebits` exponent
// bits (subnormals, overflow to infinity), as its bit pattern.
uint32_t round_to_bits(double v, int mbits, int ebits);
double bits_to_double(uint32_t bits, int mbits, int ebits);
}  // namespace rk_cpu

inline __half rk_half(double v) { return {uint16_t(rk_cpu::round_to_bits(v, 10, 5))}; }
inline __nv_bfloat16 rk_bf16(double v) { return {uint16_t(rk_cpu::round_to_bits(v, 7, 8))}; }
inline double rk_d(__half h) { return rk_cpu::bits_to_double(h.__x, 10, 5); }
inline double rk_d(__nv_bfloat16 h) { return rk_cpu::bits_to_double(h.__x, 7, 8); }

inline float __half2float(__half h) { return float(rk_d(h)); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(rk_d(h)); }
inline __half __float2half_rn(float v) { return rk_half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return rk_bf16(v); }
inline __half2 __float2half2_rn(float v) { return {rk_half(v), rk_half(v)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {rk_half(lo), rk_half(hi)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float v) { return {rk_bf16(v), rk_bf16(v)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {rk_bf16(lo), rk_bf16(hi)}; }
// Packed arithmetic: each half computed exactly in double, then rounded once.
inline __half2 __hsub2(__half2 a, __half2 b) { return {rk_half(rk_d(a.x) - rk_d(b.x)), rk_half(rk_d(a.y) - rk_d(b.y))}; }
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {rk_bf16(rk_d(a.x) - rk_d(b.x)), rk_bf16(rk_d(a.y) - rk_d(b.y))};
}
inline __half2 __hmul2(__half2 a, __half2 b) { return {rk_half(rk_d(a.x) * rk_d(b.x)), rk_half(rk_d(a.y) * rk_d(b.y))}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {rk_bf16(rk_d(a.x) * rk_d(b.x)), rk_bf16(rk_d(a.y) * rk_d(b.y))};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {rk_half(std::fma(rk_d(a.x), rk_d(b.x), rk_d(c.x))), rk_half(std::fma(rk_d(a.y), rk_d(b.y), rk_d(c.y)))};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {rk_bf16(std::fma(rk_d(a.x), rk_d(b.x), rk_d(c.x))), rk_bf16(std::fma(rk_d(a.y), rk_d(b.y), rk_d(c.y)))};
}

// ------------------------------------------------------------------ threads, blocks, barriers

namespace rk_cpu {

struct Fiber;
struct Block;
Fiber* current_fiber();  // the CUDA thread running now (this OS thread)
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_smem();

void sync_block(const char* file, int line);
// bar.sync id, 128: the 128 threads of this thread's warpgroup (warps 4w .. 4w + 3) meet (one call site)
void warpgroup_barrier(const char* file, int line);
void sync_warp(const char* file, int line);
void sync_grid(const char* file, int line);
// A warp collective: `in` (bytes) from every lane into a 32-slot table, then `out` computed from
// the whole table by each lane (out(table) after all 32 lanes arrived).
void warp_exchange(const void* in, size_t bytes, const std::function<void(const unsigned char* table, size_t stride)>& out,
                   const char* file, int line);
[[noreturn]] void trap(const char* what);

}  // namespace rk_cpu

#define threadIdx (::rk_cpu::thread_idx())
#define blockIdx (::rk_cpu::block_idx())
#define blockDim (::rk_cpu::block_dim())
#define gridDim (::rk_cpu::grid_dim())
#define __syncthreads() ::rk_cpu::sync_block(__FILE__, __LINE__)
#define __syncwarp(...) ::rk_cpu::sync_warp(__FILE__, __LINE__)
#define __trap() ::rk_cpu::trap("__trap()")

template <class V>
V rk_shfl_xor(V v, int lane_mask, const char* file, int line) {
  V out;
  const unsigned lane = threadIdx.x % 32;
  rk_cpu::warp_exchange(&v, sizeof(V), [&](const unsigned char* t, size_t stride) {
    std::memcpy(&out, t + stride * ((lane ^ unsigned(lane_mask)) & 31u), sizeof(V));
  }, file, line);
  return out;
}
#define __shfl_xor_sync(mask, v, lane_mask, ...) rk_shfl_xor((v), (lane_mask), __FILE__, __LINE__)

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------ device library

// A load of a T not aligned to T's size faults on the GPU ("misaligned address"): here too.
template <class T>
inline const T* rk_aligned_load(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) throw std::runtime_error("misaligned vector load");
  return p;
}
template <class T>
inline T __ldg(const T* p) { return *rk_aligned_load(p); }
template <class T>
inline T __ldcg(const T* p) { return *rk_aligned_load(p); }

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = uint64_t(x) | (uint64_t(y) << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((bytes >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline void sincospif(float t, float* s, float* c) {
  const double a = M_PI * double(t);
  *s = float(std::sin(a));
  *c = float(std::cos(a));
}

// CUDA's min / max overloads for mixed integer types.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline float atomicAdd(float* p, float v) {
  unsigned old = __atomic_load_n(reinterpret_cast<unsigned*>(p), __ATOMIC_SEQ_CST), want;
  do {
    want = __float_as_uint(__uint_as_float(old) + v);
  } while (!__atomic_compare_exchange_n(reinterpret_cast<unsigned*>(p), &old, want, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST));
  return __uint_as_float(old);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
// ((old >= limit) ? 0 : old + 1), as the hardware does.
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST), want;
  do {
    want = old >= limit ? 0u : old + 1u;
  } while (!__atomic_compare_exchange_n(p, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}

// ------------------------------------------------------------------ mma.sync m16n8k16 (f32 += f16/bf16)

namespace rk_cpu {
// d (this lane's 4 fp32 accumulators) += A(16x16) * B(16x8) with the PTX fragment layouts:
// lane l, g = l / 4, t = l % 4; a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d[c] = D[g + 8 (c / 2)][2t + c % 2].
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool half, const char* file,
                  int line);
}  // namespace rk_cpu

// wgmma (sm_90a, csrc/wgmma.cuh): m64nNk16, f32 += f16/bf16, A from registers (the mma.sync A
// layout, warp w holding rows 16w..16w+15), B from shared memory through a descriptor (only the
// no-swizzle K-major layout: 8-row x 16-byte core matrices, LBO between the two K halves, SBO between
// 8-row groups). A warpgroup collective at issue (A gathered from all 128 threads); the product is
// computed — and B read from shared memory — only when wgmma_wait retires its group, so reading the
// accumulators or overwriting B before the wait shows as wrong results.
namespace rk_cpu {
void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc, bool half, const char* file, int line);
void wgmma_commit();
void wgmma_wait(int n);
uint32_t smem_offset(const void* p);  // __cvta_generic_to_shared for dynamic shared memory
}  // namespace rk_cpu

// cp.async (common.cuh's wrappers, which use inline PTX on the GPU): the copy is recorded and
// lands at cp_async_wait.
namespace rk_cpu {
void cp_async16(void* smem, const void* gmem, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
// prefetch.global.L2: no effect on the data; the address is read once, so one past a tensor's end
// lands on its guard page.
void prefetch_l2(const void* p);
}  // namespace rk_cpu
