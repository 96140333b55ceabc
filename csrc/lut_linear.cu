// lut_linear: y = x @ W^T + bias, W[n, k] = lut[n / (N / L), code[n, k]].
// codes uint8 [N, K/2] (4-bit codes, low nibble = even k), lut [L, 16] in x's
// dtype, L dividing N. Any even K works (rows not 16-byte aligned, K % 32 != 0,
// are read bytewise). The 16-entry table of a row is read through the
// read-only cache (32 bytes per row group, L1-resident while its rows stream).
#include "ops.h"
#include "quant_dequant_mm.cuh"
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
  struct Params {
    const T* tab;
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t /*k0*/) const {
    return {lut + (n / rows_per_table) * 16};
  }
  // Weights 8j .. 8j+7 of the chunk = word j; byte b holds weights 2b (low nibble), 2b + 1.
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const uint32_t word = j == 0 ? raw.x : j == 1 ? raw.y : j == 2 ? raw.z : raw.w;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (word >> (8 * b)) & 0xFFu;
      w[2 * b] = to_f32<T>(p.tab[byte & 15u]);
      w[2 * b + 1] = to_f32<T>(p.tab[byte >> 4]);
    }
  }
};

}  // namespace

Tensor lut_linear_cuda(Tensor x, Tensor codes, Tensor lut, std::optional<Tensor> bias) {
  const char* op = "lut_linear";
  check_x(op, x);
  check_arg(op, "codes", codes, x, 2, ScalarType::Byte);
  check_arg(op, "lut", lut, x, 2, x.scalar_type());
  const int64_t N = codes.size(0), K = 2 * codes.size(1), L = lut.size(0);
  STD_TORCH_CHECK(K > 0, "reparam.lut_linear: in_features K must be positive");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.lut_linear: `x` last dimension must equal K = 2 * codes.shape[1]");
  STD_TORCH_CHECK(lut.size(1) == 16, "reparam.lut_linear: `lut` must be [L, 16]");
  STD_TORCH_CHECK(L > 0 && N % L == 0, "reparam.lut_linear: the number of tables L = lut.shape[0] must divide N");
  check_bias(op, bias, x, N);
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
    const T* bp = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    if (M >= quant::dequant_min_m()) return quant::dequant_matmul<decltype(dec), T>(dec, xc, bias, y, M, N, K, stream);
    quant::quant_linear(dec, static_cast<const T*>(xc.data_ptr()), bp, static_cast<T*>(y.data_ptr()), M, N, K, xc,
                        stream);
  });
  return y;
}

}  // namespace reparam
