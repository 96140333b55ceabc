// lut_linear: y = x @ W^T + bias, W[n, k] = lut[n / (N / L), code[n, k]].
// codes uint8 [N, K/2] (4-bit codes, low nibble = even k), lut [L, 16] in x's
// dtype, L dividing N. Any even K works (rows not 16-byte aligned, K % 32 != 0,
// are read bytewise). The 16-entry table of a row is read through the
// read-only cache (32 bytes per row group, L1-resident while its rows stream).
#include "ops.h"
#include "quant_gemm.cuh"

namespace reparam {
namespace {

template <class T>
struct LutDec {
  static constexpr int KC = 32;
  const uint8_t* codes;
  const T* lut;
  int64_t K, rows_per_table;
  bool vec;

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    return quant::load_row_bytes(codes + n * (K / 2), k0 / 2, K / 2, vec);
  }
  __device__ __forceinline__ void decode(const uint4& raw, int64_t n, int64_t /*k0*/, float* w) const {
    const T* tab = lut + (n / rows_per_table) * 16;
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t b = (words[wi] >> (8 * j)) & 0xFFu;
        w[wi * 8 + 2 * j] = to_f32<T>(tab[b & 15u]);
        w[wi * 8 + 2 * j + 1] = to_f32<T>(tab[b >> 4]);
      }
  }
};

}  // namespace

Tensor lut_linear_cuda(Tensor x, Tensor codes, Tensor lut, std::optional<Tensor> bias) {
  const char* op = "lut_linear";
  STD_TORCH_CHECK(x.is_cuda(), "reparam.lut_linear: `x` must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() >= 1, "reparam.lut_linear: `x` must have at least 1 dimension");
  check_arg(op, "codes", codes, x, 2, ScalarType::Byte);
  check_arg(op, "lut", lut, x, 2, x.scalar_type());
  const int64_t N = codes.size(0), K = 2 * codes.size(1), L = lut.size(0);
  STD_TORCH_CHECK(K > 0, "reparam.lut_linear: in_features K must be positive");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.lut_linear: `x` last dimension must equal K = 2 * codes.shape[1]");
  STD_TORCH_CHECK(lut.size(1) == 16, "reparam.lut_linear: `lut` must be [L, 16]");
  STD_TORCH_CHECK(L > 0 && N % L == 0, "reparam.lut_linear: the number of tables L = lut.shape[0] must divide N");
  if (bias.has_value()) {
    check_arg(op, "bias", *bias, x, 1, x.scalar_type());
    STD_TORCH_CHECK(bias->size(0) == N, "reparam.lut_linear: `bias` must have N = codes.shape[0] elements");
  }
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  const int64_t M = xc.numel() / K;
  Tensor y = torch::stable::new_empty(xc, out_shape(xc, N));
  if (M == 0 || N == 0) return y;
  cudaStream_t stream = current_stream(xc);
  dispatch_half(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
    LutDec<T> dec{cp, static_cast<const T*>(lut.data_ptr()), K, N / L, (K / 2) % 16 == 0 && aligned16(cp)};
    quant::quant_linear(dec, static_cast<const T*>(xc.data_ptr()),
                        bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                        static_cast<T*>(y.data_ptr()), M, N, K, xc, stream);
  });
  return y;
}

}  // namespace reparam
