// cuBLAS from inside an op, through the dispatcher (the stable ABI has no cuBLAS
// handle of its own): aten::linear.out, on the current stream (so it is ordered
// with our kernels and captured with them into CUDA graphs).
#pragma once

#include <array>
#include <cstdlib>
#include <optional>

#include "common.cuh"

namespace reparam {

// out[M, N] = input[M, K] @ weight[N, K]^T + bias (aten::linear.out: cuBLAS, with the bias
// fused into the GEMM's epilogue when it can be).
inline void linear_out(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& out) {
  std::array<StableIValue, 4> stack{torch::stable::detail::from(input), torch::stable::detail::from(weight),
                                    torch::stable::detail::from(bias), torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::linear", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // the returned handle (out again): released here
}

// The M threshold in environment variable `name` (default `fallback`; 0 or negative: never).
inline int64_t min_m_from_env(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  const long long m = std::atoll(v);
  return m <= 0 ? INT64_MAX : m;
}

}  // namespace reparam
