// int4_linear (W4A16, group-wise): y = x @ W^T + bias,
// W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k / group_size.
// qweight uint8 [N, K/2], two codes per byte along K, low nibble = even k;
// scales / zeros [N, K / group_size] in x's dtype. Requirements (checked):
// group_size % 32 == 0 and K % group_size == 0, so the 32 codes of a 16-byte
// chunk share one group (one scale and zero point per chunk).
#include "ops.h"
#include "quant_gemm.cuh"

namespace reparam {
namespace {

template <class T>
struct Int4Dec {
  static constexpr int KC = 32;
  const uint8_t* q;
  const T* scales;
  const T* zeros;
  int64_t K, G, group;
  bool vec;

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(q + n * (K / 2), k0 / 2, K / 2, vec);
  }
  struct Params {
    float s, zs;  // (q - z) * s = q * s + zs: one FMA per weight
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t k0) const {
    const int64_t g = n * G + k0 / group;
    const float s = to_f32<T>(scales[g]);
    return {s, -to_f32<T>(zeros[g]) * s};
  }
  // Weights 8j .. 8j+7 of the chunk = bytes 4j .. 4j+3 = word j; byte b of the word
  // holds weight 2b (low nibble) and 2b + 1 (high nibble).
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t word = j == 0 ? raw.x : j == 1 ? raw.y : j == 2 ? raw.z : raw.w;
    const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      w[2 * b] = fmaf(quant::byte_to_float(lo, b), p.s, p.zs);
      w[2 * b + 1] = fmaf(quant::byte_to_float(hi, b), p.s, p.zs);
    }
  }
};

}  // namespace

Tensor int4_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int64_t group_size,
                        std::optional<Tensor> bias) {
  const char* op = "int4_linear";
  check_x(op, x);
  check_arg(op, "qweight", qweight, x, 2, ScalarType::Byte);
  check_arg(op, "scales", scales, x, 2, x.scalar_type());
  check_arg(op, "zeros", zeros, x, 2, x.scalar_type());
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  STD_TORCH_CHECK(K > 0, "reparam.int4_linear: in_features K must be positive");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.int4_linear: `x` last dimension must equal K = 2 * qweight.shape[1]");
  STD_TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "reparam.int4_linear: `group_size` must be a positive multiple of 32");
  STD_TORCH_CHECK(K % group_size == 0, "reparam.int4_linear: `group_size` must divide in_features K");
  const int64_t G = K / group_size;
  STD_TORCH_CHECK(scales.size(0) == N && scales.size(1) == G, "reparam.int4_linear: `scales` must be [N, K / group_size]");
  STD_TORCH_CHECK(zeros.size(0) == N && zeros.size(1) == G, "reparam.int4_linear: `zeros` must be [N, K / group_size]");
  check_bias(op, bias, x, N);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  const int64_t M = xc.numel() / K;
  Tensor y = torch::stable::new_empty(xc, out_shape(xc, N));
  if (M == 0 || N == 0) return y;
  cudaStream_t stream = current_stream(xc);
  dispatch_half(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* qp = static_cast<const uint8_t*>(qweight.data_ptr());
    // K % 32 == 0, so every row is 16-byte aligned when the base is
    Int4Dec<T> dec{qp, static_cast<const T*>(scales.data_ptr()), static_cast<const T*>(zeros.data_ptr()),
                   K, G, group_size, aligned16(qp)};
    quant::quant_linear(dec, static_cast<const T*>(xc.data_ptr()),
                        bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                        static_cast<T*>(y.data_ptr()), M, N, K, xc, stream);
  });
  return y;
}

}  // namespace reparam
