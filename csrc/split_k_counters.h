// Arrival counters for split-K kernels that finish their own reduction: the
// CTAs of one output column block each write an fp32 partial, bump the
// column's counter with atomicInc(counter, splits - 1), and the CTA that sees
// splits - 1 sums every partial in a fixed order (deterministic) and writes y.
// atomicInc wraps to 0 on that last arrival, so a counter is back at 0 after
// every complete launch: one zeroed buffer serves every later launch, CUDA
// graph replays included, with no memset per call (a memset node would cost
// as much as the whole decode GEMV it serves).
//
// One buffer per (device, stream): launches on one stream are ordered, so they
// never share a counter at the same time. (Two CUDA graphs captured on one
// stream and replayed at once on two streams would; that is not supported.)
// A buffer is made on the first call on a stream, also when that call is being
// captured into a CUDA graph: the thread switches to relaxed capture mode so
// cudaMalloc is allowed, and zeroes the buffer on a private stream outside the
// capture. Buffers live until the process ends.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace reparam {

constexpr int64_t kSplitCounterCapacity = int64_t(1) << 16;  // column blocks per launch

namespace detail {
inline unsigned* new_zeroed_counters() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return nullptr;
  unsigned* p = nullptr;
  cudaStream_t side = nullptr;
  const size_t bytes = kSplitCounterCapacity * sizeof(unsigned);
  bool ok = cudaMalloc(&p, bytes) == cudaSuccess &&
            cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) == cudaSuccess &&
            cudaMemsetAsync(p, 0, bytes, side) == cudaSuccess && cudaStreamSynchronize(side) == cudaSuccess;
  if (side != nullptr) ok = cudaStreamDestroy(side) == cudaSuccess && ok;
  if (!ok) {
    (void)cudaGetLastError();
    if (p != nullptr) (void)cudaFree(p);
    p = nullptr;
  }
  cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
  return p;
}
}  // namespace detail

// The zeroed counters of (device, stream), or nullptr when `columns` exceeds the
// capacity or CUDA refused (the caller then takes a path without counters).
inline unsigned* split_k_counters(int device, cudaStream_t stream, int64_t columns) {
  if (columns > kSplitCounterCapacity) return nullptr;
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, unsigned*>();  // never freed
  std::lock_guard<std::mutex> lock(mu);
  auto it = buffers->find({device, stream});
  if (it != buffers->end()) return it->second;
  unsigned* p = detail::new_zeroed_counters();
  if (p != nullptr) buffers->emplace(std::make_pair(device, stream), p);
  return p;
}

}  // namespace reparam
