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

// ---- the device side, shared by the kernels that finish their own split-K reduction

// Called by every thread of the CTA after it wrote its split's partials of one output tile: true in
// the CTA that arrived last for that tile, to which every split's partials are then visible.
__device__ __forceinline__ bool arrived_last(unsigned* counter, int64_t splits) {
  __shared__ unsigned is_last;
  __threadfence();
  __syncthreads();  // (also: every thread read the previous call's is_last before it is rewritten)
  if (threadIdx.x == 0) is_last = atomicInc(counter, unsigned(splits - 1)) == unsigned(splits - 1);
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  return true;
}

// The sum over s < splits of part[s * stride], in split order (deterministic). 16 partials are in
// flight before any is added: a narrow tile with many splits (the low-rank phase 1 at M = 1: 64)
// would otherwise wait 64 L2 latencies.
__device__ __forceinline__ float sum_splits(const float* part, int64_t splits, int64_t stride) {
  constexpr int kBatch = 16;
  float v = 0.f;
  for (int64_t s0 = 0; s0 < splits; s0 += kBatch) {
    float got[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) got[u] = s0 + u < splits ? __ldcg(part + (s0 + u) * stride) : 0.f;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) v += got[u];
  }
  return v;
}

// The last CTA's work on a split tile of `outs` outputs (called by every thread of the CTA): output
// e's partials sit at part + off(e) + s * stride (off(e) < 0: outside the matrix, skipped), and
// done(e, sum) finishes it. Each thread takes kJ outputs at a time with their loads in flight
// together (up to 32), summing each in split order (deterministic, the same sums as sum_splits): a
// tile with many outputs per thread (the wgmma tiles: up to 64; the small-M M <= 16 tile: 8) no
// longer waits one round of L2 latency per output. With `scratch` (kThreads floats of shared memory,
// free) and at most half as many outputs as threads and many splits (the low-rank phase 1 at M = 1:
// 128 outputs, 64 splits), P threads share an output instead, each summing a contiguous 1/P of the
// splits, and the shares meet in `scratch` in order: P times fewer rounds of L2 latency.
template <int kThreads, class Off, class Done>
__device__ __forceinline__ void finish_split_tile(const float* part, int64_t splits, int64_t stride, int outs,
                                                  Off off, Done done, float* scratch = nullptr) {
  const int P = scratch != nullptr && outs * 2 <= kThreads ? int(min(int64_t(kThreads / outs), (splits + 15) / 16)) : 1;
  if (P > 1) {
    const int e = threadIdx.x, o = e % outs, share = e / outs;  // share < P for e < outs * P
    const bool mine = e < outs * P;
    const int64_t at = mine ? off(o) : -1;
    const int64_t per = (splits + P - 1) / P, s_lo = share * per, s_hi = min(splits, s_lo + per);
    float v = 0.f;
    if (at >= 0 && s_lo < s_hi) v = sum_splits(part + at + s_lo * stride, s_hi - s_lo, stride);
    if (mine && share > 0) scratch[(share - 1) * outs + o] = v;
    __syncthreads();
    if (at >= 0 && share == 0) {
      for (int q = 1; q < P; ++q) v += scratch[(q - 1) * outs + o];
      done(o, v);
    }
    return;
  }
  constexpr int kJ = 8, kBatch = 4;
  for (int e0 = threadIdx.x; e0 < outs; e0 += kJ * kThreads) {
    int64_t o[kJ];
    float v[kJ];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int e = e0 + j * kThreads;
      o[j] = e < outs ? off(e) : -1;
      v[j] = 0.f;
    }
    for (int64_t s0 = 0; s0 < splits; s0 += kBatch) {
      float got[kBatch][kJ];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
#pragma unroll
        for (int j = 0; j < kJ; ++j) got[u][j] = o[j] >= 0 && s0 + u < splits ? __ldcg(part + o[j] + (s0 + u) * stride) : 0.f;
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
#pragma unroll
        for (int j = 0; j < kJ; ++j) v[j] += got[u][j];
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      if (o[j] >= 0) done(e0 + j * kThreads, v[j]);
  }
}

}  // namespace reparam
