// Shared helpers for the CUDA kernels: stable-ABI tensor checks, the current
// stream, dtype dispatch, and small device utilities. Stable ABI only (no ATen).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

namespace reparam {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#define RK_CUDA_CHECK(expr)                                                    \
  do {                                                                         \
    cudaError_t rk_err_ = (expr);                                              \
    STD_TORCH_CHECK(rk_err_ == cudaSuccess, "CUDA error: ",                    \
                    cudaGetErrorString(rk_err_), " (" #expr ")");              \
  } while (0)

inline cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(t.get_device_index(), &s));
  return static_cast<cudaStream_t>(s);
}

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    default: return "another dtype";
  }
}

// Checks that `t` (argument `name` of op `op`) is a contiguous CUDA tensor on
// x's device with `ndim` dims (ndim < 0: any) and dtype `dtype`.
inline void check_arg(const char* op, const char* name, const Tensor& t, const Tensor& x,
                      int64_t ndim, ScalarType dtype) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == x.get_device_index(), "reparam.", op,
                  ": `", name, "` must be on the same CUDA device as `x`");
  STD_TORCH_CHECK(ndim < 0 || t.dim() == ndim, "reparam.", op, ": `", name, "` must be ", ndim,
                  "-D, got ", t.dim(), "-D");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "reparam.", op, ": `", name, "` must be ",
                  dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.is_contiguous(), "reparam.", op, ": `", name, "` must be contiguous");
}

// `x` is a CUDA tensor with at least one dimension (the [..., K] input of every op).
inline void check_x(const char* op, const Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "reparam.", op, ": `x` must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() >= 1, "reparam.", op, ": `x` must have at least 1 dimension");
}

// The optional bias is a contiguous [n] tensor of x's dtype on x's device.
inline void check_bias(const char* op, const std::optional<Tensor>& bias, const Tensor& x, int64_t n) {
  if (!bias.has_value()) return;
  check_arg(op, "bias", *bias, x, 1, x.scalar_type());
  STD_TORCH_CHECK(bias->size(0) == n, "reparam.", op, ": `bias` must have out_features = ", n,
                  " elements, got ", bias->size(0));
}

// The p x q grid of b x b blocks (argument `w` of op `op`) covers an N x K weight: K and N fit the last
// block column and row (the block-circulant ops; x is zero-padded to q b, outputs past N dropped).
inline void check_block_grid(const char* op, const char* w, int64_t p, int64_t q, int64_t b, int64_t K, int64_t N) {
  STD_TORCH_CHECK(q >= 1 && (q - 1) * b < K && K <= q * b, "reparam.", op,
                  ": `x` last dimension does not fit the q block columns of `", w, "`");
  STD_TORCH_CHECK(p >= 1 && (p - 1) * b < N && N <= p * b, "reparam.", op,
                  ": `out_features` does not fit the p block rows of `", w, "`");
}

// A device attribute, read once per device and attribute (a template argument: each its own cache).
template <cudaDeviceAttr A>
inline int device_attribute(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) RK_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], A, device));
  return cached[device];
}

inline int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }
inline int64_t l2_bytes(int device) { return device_attribute<cudaDevAttrL2CacheSize>(device); }
inline int max_smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// How many CTAs of `Kernel` (`threads` each, `smem` bytes of dynamic shared memory: the same at every call for
// one kernel) fit on the GPU at once; the occupancy query once per kernel instance and device.
template <auto Kernel>
inline int64_t resident_ctas_of(int device, int threads, size_t smem = 0) {
  static int cached[64] = {0};
  const int d = device >= 0 && device < 64 ? device : 0;
  if (cached[d] == 0) {
    int per_sm = 0;
    RK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem));
    cached[d] = per_sm > 0 ? per_sm : 1;
  }
  return int64_t(cached[d]) * sm_count(device);
}

// Lets `Kernel` launch with up to `bytes` of dynamic shared memory (0: the device's opt-in maximum;
// > 48 KB needs it; a kernel with static shared memory must pass what it needs, the sum may not pass
// the maximum), once per device (a template argument: each kernel instance has its own flags).
template <auto Kernel>
inline void allow_smem_optin(int device, int bytes = 0) {
  static bool done[64] = {false};
  const int slot = (device >= 0 && device < 64) ? device : 0;
  if (done[slot]) return;
  RK_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     bytes > 0 ? bytes : max_smem_optin(device)));
  done[slot] = true;
}

// Blocks of 256 threads for a grid-stride loop over n elements: enough to fill the GPU, no more.
inline unsigned grid_stride_blocks(int64_t n, int device) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 16 * int64_t(sm_count(device)))));
}

// Runs f(T{}) with T = __half or __nv_bfloat16 matching `st`; other dtypes error.
template <class F>
inline void dispatch_half(ScalarType st, const char* op, F&& f) {
  if (st == ScalarType::Half) {
    f(__half{});
  } else if (st == ScalarType::BFloat16) {
    f(__nv_bfloat16{});
  } else {
    STD_TORCH_CHECK(false, "reparam.", op, ": the CUDA kernel takes float16 or bfloat16 `x`, got ",
                    dtype_name(st), " (the Python wrapper routes other dtypes to Triton/reference)");
  }
}

// Output shape: x's leading dims, then `last`.
inline std::vector<int64_t> out_shape(const Tensor& x, int64_t last) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) s.push_back(x.size(d));
  s.push_back(last);
  return s;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// A path's off switch: on unless environment variable `name` starts with '0' (REPARAM_SMALL_M=0 etc.: A/B
// timing, bisecting; run_gpu.sh turns a path off this way when its smoke test fails on the GPU).
inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || v[0] != '0';
}
// A path that is off until timed: on only where `name` starts with '1' (REPARAM_SMALL_M_X_AHEAD=1 etc.).
inline bool env_opt_in(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

template <class T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// 16-byte asynchronous global->shared copy; src_bytes = 0 zero-fills the destination.
#ifndef REPARAM_CPU_CUDA
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// A hint: bring the line holding p into L2 (no registers, no wait). Only valid addresses are passed.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
// The same into L1 (and L2): for data a few hundred cycles from its use that the SM's own loads will read.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p)); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// bar.sync kId, 128: a barrier of the 128 threads of this thread's warpgroup (warps 4w .. 4w + 3) only,
// named kId (1..15; 0 is __syncthreads'; an immediate: with a register id ptxas reserves all 16 named
// barriers for the kernel). The small-M ring's x tile is shared by one warpgroup.
template <int kId>
__device__ __forceinline__ void warpgroup_bar() {
  asm volatile("bar.sync %0, 128;\n" ::"n"(kId) : "memory");
}
// 16 bytes from shared memory, as a volatile asm: kept after the cp_async_wait before it and before
// the next cp_async16 after it in program order (a thread reading back its own copies needs no barrier,
// only that order; a plain load could be moved across the asm statements).
__device__ __forceinline__ uint4 ld_shared16(const void* smem) {
  uint4 v;
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(s));
  return v;
}
// A shared-memory address as the 32-bit offset ld.shared takes: a table lookup is then one LEA of the
// index onto it and one LDS (through a generic pointer the compiler adds 64-bit and may not prove the
// space). Volatile like ld_shared16: kept after the barrier that published the table.
using smem_addr = uint32_t;
__device__ __forceinline__ smem_addr smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint32_t ld_shared32(smem_addr a) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}
#else  // the CPU execution harness (python_tests/cuda_on_cpu) models the copies instead of the PTX
inline void cp_async16(void* smem, const void* gmem, int src_bytes) { ::rk_cpu::cp_async16(smem, gmem, src_bytes); }
inline void cp_async_commit() { ::rk_cpu::cp_async_commit(); }
inline void prefetch_l2(const void* p) { ::rk_cpu::prefetch_l2(p); }
inline void prefetch_l1(const void* p) { ::rk_cpu::prefetch_l2(p); }  // (the model: a read of the address)
template <int N> inline void cp_async_wait() { ::rk_cpu::cp_async_wait(N); }
inline uint4 ld_shared16(const void* smem) { return *static_cast<const uint4*>(smem); }
using smem_addr = uintptr_t;  // (a host pointer here: see the device version below)
inline smem_addr smem_address(const void* p) { return reinterpret_cast<uintptr_t>(p); }
inline uint32_t ld_shared32(smem_addr a) { return *reinterpret_cast<const uint32_t*>(a); }
template <int kId>
inline void warpgroup_bar(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::rk_cpu::warpgroup_barrier(file, line);
}
#endif

}  // namespace reparam
