// CUDA on the CPU: the runtime API calls the project makes, on host memory and a fake device
// (RK_CPU_SMS, RK_CPU_CC_MAJOR, RK_CPU_PTX_VERSION).
#include <cstdlib>
#include <cstring>

#include "scheduler.h"

namespace rk_cpu {
void set_last_error(cudaError_t e) { last_error() = e; }
int fake_arch_version() { return 10 * fake_cc_major(); }
int fake_ptx_version() { return int(env_u64("RK_CPU_PTX_VERSION", uint64_t(fake_arch_version()))); }
}  // namespace rk_cpu

// ------------------------------------------------------------------ runtime API

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = rk_cpu::last_error();
  rk_cpu::last_error() = cudaSuccess;
  return e;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = rk_cpu::fake_sms(); return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = rk_cpu::fake_l2_bytes(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = rk_cpu::fake_cc_major(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = rk_cpu::kSmemOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes);
  if (*p) std::memset(*p, 0xA5, bytes);  // garbage: the caller must initialize
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static int token;
  *s = &token;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) { return cudaSuccess; }
