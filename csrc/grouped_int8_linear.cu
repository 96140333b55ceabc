// grouped_int8_linear: a mixture-of-experts layer's int8 experts in one launch (grouped_quant.cuh), rows
// expert_offsets[e] .. [e + 1] of x [T, K] through expert e. qweight int8 [E, N, K], scales [E, N], bias
// [E, N]: each expert's layout as int8_linear.cu's.
#include "grouped_quant.cuh"
#include "int8_format.cuh"
#include "ops.h"

namespace reparam {

Tensor grouped_int8_linear_cuda(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales,
                                std::optional<Tensor> bias) {
  const char* op = "grouped_int8_linear";
  check_x(op, x);
  check_arg(op, "qweight", qweight, x, 3, ScalarType::Char);
  const int64_t E = qweight.size(0), N = qweight.size(1), K = qweight.size(2);
  grouped::check_rows(op, x, expert_offsets, E, N, K, bias);
  check_arg(op, "scales", scales, x, 2, x.scalar_type());
  STD_TORCH_CHECK(scales.size(0) == E && scales.size(1) == N, "reparam.grouped_int8_linear: `scales` must be [E, N]");
  return grouped::with_output(op, x, N, [&](auto tag, const Tensor& xc, Tensor& y, cudaStream_t stream) {
    using T = decltype(tag);
    const uint8_t* qp = static_cast<const uint8_t*>(qweight.data_ptr());
    const T* sp = static_cast<const T*>(scales.data_ptr());
    const bool rows_aligned = K % 16 == 0 && aligned16(qp);  // of the [E N, K] stack
    grouped::linear<T>(Int8Frag<T>{{qp, K}, sp}, rows_aligned, Int8Dec<T>{qp, sp, K, rows_aligned}, xc,
                       expert_offsets, E, bias, y, N, K, stream);
  });
}

}  // namespace reparam
