// Hopper warpgroup MMA (wgmma, sm_90a only) for the kernels that use it (quant_wgmma.cuh):
// D[64, N] (fp32, registers) += A[64, 16] (fp16/bf16, registers) * B[16, N] (shared memory).
//
// A from registers: warp w of the warpgroup holds rows 16w .. 16w + 15 in the mma.sync m16n8k16 A
// layout (lane l, g = l / 4, t = l % 4: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]). D: d[4j + 2 v1 + v0] = D[16w + g + 8 v1][8j + 2t + v0].
// B from shared memory, K-major without swizzle: 8 x 16-byte "core matrices" (8 columns n of B,
// 8 consecutive k each), the two k halves LBO bytes apart, consecutive groups of 8 columns SBO bytes
// apart (the matrix descriptor: start, LBO, SBO in 16-byte units, bits 0-13 / 16-29 / 32-45,
// layout type 0 = no swizzle in bits 62-63).
//
// Asynchronous: the accumulators and the A registers of an issued wgmma must not be touched until
// wait<n>() retires its group (keep() pins registers for the compiler), and shared memory written by
// ordinary stores or cp.async must be made visible to the async proxy (fence_proxy_async()) and to
// the whole warpgroup (a barrier) before a wgmma reads it.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace reparam {
namespace wgmma {

__device__ __forceinline__ uint64_t desc_no_swizzle(const void* smem, uint32_t lbo, uint32_t sbo) {
#ifdef REPARAM_CPU_CUDA
  const uint32_t addr = ::rk_cpu::smem_offset(smem);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#endif
  return uint64_t((addr >> 4) & 0x3FFFu) | (uint64_t((lbo >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFFu) << 32);
}

#ifdef REPARAM_CPU_CUDA  // the CPU execution harness (python_tests/cuda_on_cpu) models these

template <int N, class T>
inline void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {
  ::rk_cpu::wgmma_rs(d, N, a, desc, std::is_same<T, __half>::value, __FILE__, __LINE__);
}
inline void fence() {}
inline void commit() { ::rk_cpu::wgmma_commit(); }
template <int N>
inline void wait() { ::rk_cpu::wgmma_wait(N); }
inline void fence_proxy_async() {}
inline void keep(float&) {}
inline void keep(uint32_t&) {}
inline void keep(uint64_t&) {}

#else

template <int N, class T>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// An empty asm that "reads and writes" r: the compiler keeps r in place across it.
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void keep(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep(uint64_t& r) { asm volatile("" : "+l"(r)::"memory"); }

// wgmma m64n64k16 with A from registers, for T = fp16 ("f16") or bf16 ("bf16").
#define RK_WGMMA_RS_64(T, DT)                                                              \
  template <>                                                                         \
  __device__ __forceinline__ void mma_rs<64, T>(float(&d)[32], const uint32_t(&a)[4], uint64_t desc) { \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " {"           \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"   \
                 "}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"              \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),   \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));              \
  }
// wgmma m64n128k16 with A from registers, for T = fp16 ("f16") or bf16 ("bf16").
#define RK_WGMMA_RS_128(T, DT)                                                              \
  template <>                                                                         \
  __device__ __forceinline__ void mma_rs<128, T>(float(&d)[64], const uint32_t(&a)[4], uint64_t desc) { \
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " {"           \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"   \
                 "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"              \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),   \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),   \
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),   \
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),   \
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),   \
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));              \
  }
RK_WGMMA_RS_64(__half, "f16")
RK_WGMMA_RS_64(__nv_bfloat16, "bf16")
RK_WGMMA_RS_128(__half, "f16")
RK_WGMMA_RS_128(__nv_bfloat16, "bf16")
#undef RK_WGMMA_RS_64
#undef RK_WGMMA_RS_128

#else  // not sm_90a: never called (the host takes this path only on sm_90), empty so the file compiles
__device__ __forceinline__ void fence() {}
__device__ __forceinline__ void commit() {}
template <int N>
__device__ __forceinline__ void wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void keep(float&) {}
__device__ __forceinline__ void keep(uint32_t&) {}
__device__ __forceinline__ void keep(uint64_t&) {}
template <int N, class T>
__device__ __forceinline__ void mma_rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t) {}
#endif

#endif  // REPARAM_CPU_CUDA

}  // namespace wgmma
}  // namespace reparam
