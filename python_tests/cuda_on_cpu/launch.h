// The host side of CUDA on the CPU (runtime.h): kernel launches, the runtime API calls the
// project makes, WMMA and cooperative groups. Included through the shadow headers in include/.
#pragma once

#include <tuple>

#include "runtime.h"

typedef void* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
constexpr unsigned cudaStreamNonBlocking = 1;

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMalloc(void** p, size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode);

namespace rk_cpu {
// Runs body() as every thread of every block of the grid; errors (a bad configuration, a
// divergent barrier, a deadlock, __trap) throw std::runtime_error.
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, bool cooperative,
              const std::function<void()>& body);
// "<kernel as written at the launch> [with P = {its parameter types}]", for the launch trace.
template <class... P>
std::string kernel_name(const char* text) {
  std::string pretty = __PRETTY_FUNCTION__;
  const size_t with = pretty.find(" [with"), end = pretty.find(';', with);
  return std::string(text) + pretty.substr(with, end == std::string::npos ? std::string::npos : end - with) + "]";
}
void set_max_dynamic_smem(const void* kernel, int bytes);
int blocks_per_sm(const void* kernel, int threads, size_t smem);
void set_last_error(cudaError_t e);
int fake_arch_version();
int fake_ptx_version();

template <class... P>
struct Launcher {
  std::string name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(name.c_str(), reinterpret_cast<const void*>(k), grid, block, smem, false, [&] {
      std::tuple<std::decay_t<P>...> mine = params;  // each thread gets its own copy, as from constant memory
      std::apply(k, mine);
    });
  }
};
// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to
// `launcher("kernel", kernel, grid, block, smem, stream)(args)`.
template <class... P, class G, class B>
Launcher<P...> launcher(const char* text, void (*kernel)(P...), G grid, B block, size_t smem = 0,
                        cudaStream_t = nullptr) {
  return {kernel_name<P...>(text), kernel, dim3(grid), dim3(block), smem};
}
// `cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), ...)` is rewritten to this.
template <class... P>
cudaError_t launch_cooperative(const char* text, void (*kernel)(P...), dim3 grid, dim3 block, void** params, size_t smem,
                               cudaStream_t = nullptr) {
  std::tuple<std::decay_t<P>...> args = [&]<size_t... I>(std::index_sequence<I...>) {
    return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(params[I])...);
  }(std::index_sequence_for<P...>{});
  run_grid(kernel_name<P...>(text).c_str(), reinterpret_cast<const void*>(kernel), grid, block, smem, true, [&] {
    std::tuple<std::decay_t<P>...> mine = args;
    std::apply(kernel, mine);
  });
  return cudaSuccess;
}
}  // namespace rk_cpu

template <class K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) rk_cpu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion, maxThreadsPerBlock, numRegs;
  size_t sharedSizeBytes, localSizeBytes;
};
// The kernel's binary and PTX versions: the fake GPU's (RK_CPU_CC_MAJOR * 10), or RK_CPU_PTX_VERSION
// (a build without the newest architecture's code).
template <class K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K) {
  *attr = {};
  attr->binaryVersion = rk_cpu::fake_arch_version();
  attr->ptxVersion = rk_cpu::fake_ptx_version();
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K kernel, int threads, size_t smem) {
  *n = rk_cpu::blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem);
  return cudaSuccess;
}

// ------------------------------------------------------------------ cooperative groups

namespace cooperative_groups {
struct grid_group {
  void sync() const { rk_cpu::sync_grid(__FILE__, __LINE__); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ------------------------------------------------------------------ WMMA 16x16x16
// Lane l holds elements 8l .. 8l + 7 of the 16x16 tile in row-major order of its logical
// (row, column); loads and stores are per lane, mma_sync is a warp collective.

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 is modelled");
  using element_type = std::conditional_t<std::is_same_v<Use, accumulator>, float, T>;
  static constexpr int num_elements = 8;
  element_type x[8];
};

inline int rk_lane() { return int(threadIdx.x % 32); }

template <class T>
inline double rk_val(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return rk_d(v);
}

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * rk_lane() + e, r = idx / 16, c = idx % 16;
    const bool col = std::is_same_v<L, col_major>;
    f.x[e] = col ? p[c * ldm + r] : p[r * ldm + c];
  }
  __syncwarp();
}
template <class T>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * rk_lane() + e, r = idx / 16, c = idx % 16;
    (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[e];
  }
  __syncwarp();
}
template <class T, class L>
void fill_fragment(fragment<accumulator, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}
template <class T, class LA, class LB, class TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
  struct Payload {
    T a[8], b[8];
  } mine;
  std::memcpy(mine.a, a.x, sizeof(mine.a));
  std::memcpy(mine.b, b.x, sizeof(mine.b));
  float out[8];
  const int lane = rk_lane();
  rk_cpu::warp_exchange(&mine, sizeof(mine), [&](const unsigned char* t, size_t stride) {
    auto at = [&](int r, int k) {  // A[r][k] and B[k][n] from the lanes that hold them
      const int idx = 16 * r + k;
      return rk_val(reinterpret_cast<const Payload*>(t + stride * (idx / 8))->a[idx % 8]);
    };
    auto bt = [&](int k, int n) {
      const int idx = 16 * k + n;
      return rk_val(reinterpret_cast<const Payload*>(t + stride * (idx / 8))->b[idx % 8]);
    };
    for (int e = 0; e < 8; ++e) {
      const int idx = 8 * lane + e, r = idx / 16, n = idx % 16;
      double s = c.x[e];
      for (int k = 0; k < 16; ++k) s += at(r, k) * bt(k, n);
      out[e] = float(s);
    }
  }, "wmma::mma_sync", 0);
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
