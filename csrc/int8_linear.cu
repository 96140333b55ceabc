// int8_linear (W8A16): y = (x @ qweight^T) * scales + bias.
// qweight int8 [N, K] row-major, scales [N] in x's dtype (per output channel).
// The dequantizing GEMV / tensor-core GEMM is in quant_gemm.cuh; this file is
// the int8 decoder and the argument checks. Any K works (rows that are not
// 16-byte aligned, i.e. K % 16 != 0, are read bytewise).
#include "ops.h"
#include "quant_dequant_mm.cuh"
#include "quant_gemm.cuh"
#include "int8_format.cuh"
#include "quant_wgmma.cuh"

namespace reparam {

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
    const T* sp = static_cast<const T*>(scales.data_ptr());
    const bool rows_aligned = K % 16 == 0 && aligned16(qp);
    if (quant_wgmma::register_fed_linear(Int8Frag<T>{{qp, K}, sp}, rows_aligned, static_cast<const T*>(xc.data_ptr()),
                                bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                                static_cast<T*>(y.data_ptr()), M, N, K, xc, stream))
      return;
    quant::general_linear<Int8Dec<T>, T>(Int8Dec<T>{qp, sp, K, rows_aligned}, xc, bias, y, M, N, K, stream);
  });
  return y;
}

}  // namespace reparam
