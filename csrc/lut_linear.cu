// lut_linear: y = x @ W^T + bias, W[n, k] = lut[n / (N / L), code[n, k]].
// codes uint8 [N, K/2] (4-bit codes, low nibble = even k), lut [L, 16] in x's
// dtype, L dividing N. Any even K works (rows not 16-byte aligned, K % 32 != 0,
// are read bytewise). The 16-entry table of a row is read through the
// read-only cache (32 bytes per row group, L1-resident while its rows stream).
#include "lut_format.cuh"
#include "ops.h"
#include "quant_dequant_mm.cuh"
#include "quant_gemm.cuh"
#include "quant_wgmma.cuh"

namespace reparam {

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
    const T* lp = static_cast<const T*>(lut.data_ptr());
    const bool aligned = K % 32 == 0 && aligned16(cp) && aligned16(lp);  // 16-byte code rows, 32-byte tables
    if (quant_wgmma::register_fed_linear(LutFrag<T>{cp, lp, K, N / L}, aligned, static_cast<const T*>(xc.data_ptr()),
                                bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                                static_cast<T*>(y.data_ptr()), M, N, K, xc, stream))
      return;
    quant::general_linear<LutDec<T>, T>(LutDec<T>{cp, lp, K, N / L, (K / 2) % 16 == 0 && aligned16(cp)}, xc, bias, y,
                                        M, N, K, stream);
  });
  return y;
}

}  // namespace reparam
