// int8_linear (W8A16): y = (x @ qweight^T) * scales + bias.
// qweight int8 [N, K] row-major, scales [N] in x's dtype (per output channel).
// The dequantizing GEMV / tensor-core GEMM is in quant_gemm.cuh; this file is
// the int8 decoder and the argument checks. Any K works (rows that are not
// 16-byte aligned, i.e. K % 16 != 0, are read bytewise).
#include "ops.h"
#include "quant_gemm.cuh"

namespace reparam {
namespace {

template <class T>
struct Int8Dec {
  static constexpr int KC = 16;
  const uint8_t* q;
  const T* scales;
  int64_t K;
  bool vec;

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(q + n * K, k0, K, vec);
  }
  struct Params {
    float s;
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t /*k0*/) const { return {to_f32<T>(scales[n])}; }
  // Weights 8j .. 8j+7 of the chunk: bytes 8j .. 8j+7 = words 2j, 2j+1.
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t lo = j == 0 ? raw.x : raw.z, hi = j == 0 ? raw.y : raw.w;
    // ^ 0x80 maps int8 q to the unsigned byte q + 128.
    const uint32_t words[2] = {lo ^ 0x80808080u, hi ^ 0x80808080u};
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = (quant::byte_to_float(words[i / 4], i % 4) - 128.f) * p.s;
  }
};

}  // namespace

Tensor int8_linear_cuda(Tensor x, Tensor qweight, Tensor scales, std::optional<Tensor> bias) {
  const char* op = "int8_linear";
  check_x(op, x);
  check_arg(op, "qweight", qweight, x, 2, ScalarType::Char);
  check_arg(op, "scales", scales, x, 1, x.scalar_type());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  STD_TORCH_CHECK(K > 0, "reparam.int8_linear: in_features K must be positive");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.int8_linear: `x` last dimension must equal K = qweight.shape[1]");
  STD_TORCH_CHECK(scales.size(0) == N, "reparam.int8_linear: `scales` must have N = qweight.shape[0] elements");
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
    Int8Dec<T> dec{qp, static_cast<const T*>(scales.data_ptr()), K, K % 16 == 0 && aligned16(qp)};
    quant::quant_linear(dec, static_cast<const T*>(xc.data_ptr()),
                        bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                        static_cast<T*>(y.data_ptr()), M, N, K, xc, stream);
  });
  return y;
}

}  // namespace reparam
