// int4_linear (W4A16, group-wise): y = x @ W^T + bias,
// W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k / group_size.
// qweight uint8 [N, K/2], two codes per byte along K, low nibble = even k;
// scales / zeros [N, K / group_size] in x's dtype. Requirements (checked):
// group_size % 32 == 0 and K % group_size == 0, so the 32 codes of a 16-byte
// chunk share one group (one scale and zero point per chunk).
#include "ops.h"
#include "quant_dequant_mm.cuh"
#include "quant_gemm.cuh"
#include "int4_format.cuh"
#include "quant_wgmma.cuh"

namespace reparam {

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
    const T* sp = static_cast<const T*>(scales.data_ptr());
    const T* zp = static_cast<const T*>(zeros.data_ptr());
    const bool pow2_group = (group_size & (group_size - 1)) == 0;
    const T* xp = static_cast<const T*>(xc.data_ptr());
    const T* bp = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    T* yp = static_cast<T*>(y.data_ptr());
    // (opt-in, untimed: one stage of 128 k lies in one group when group_size % 128 == 0)
    if (pow2_group && group_size % 128 == 0 && small_m::post_scale_enabled() &&
        small_m::linear_small_m_transposed(Int4PostFrag<T>{{qp, sp, zp, K, ilog2(group_size)}}, aligned16(qp), xp,
                                           bp, yp, M, N, K, xc, stream))
      return;
    // (the register-fed paths shift instead of dividing)
    if (pow2_group && quant_wgmma::register_fed_linear(Int4Frag<T>{qp, sp, zp, K, ilog2(group_size)}, aligned16(qp),
                                                       xp, bp, yp, M, N, K, xc, stream))
      return;
    // K % 32 == 0, so every row is 16-byte aligned when the base is
    const Int4Dec<T> dec{qp, sp, zp, K, G, group_size, aligned16(qp), pow2_group ? ilog2(group_size) : -1};
    quant::general_linear<Int4Dec<T>, T>(dec, xc, bias, y, M, N, K, stream);
  });
  return y;
}

}  // namespace reparam
