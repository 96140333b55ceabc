// grouped_int4_linear: a mixture-of-experts layer's int4 experts in one launch (grouped_quant.cuh), rows
// expert_offsets[e] .. [e + 1] of x [T, K] through expert e. qweight uint8 [E, N, K/2], scales / zeros
// [E, N, K / group_size], bias [E, N]: each expert's layout as int4_linear.cu's.
#include "grouped_quant.cuh"
#include "int4_format.cuh"
#include "ops.h"

namespace reparam {

Tensor grouped_int4_linear_cuda(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales, Tensor zeros,
                                int64_t group_size, std::optional<Tensor> bias) {
  const char* op = "grouped_int4_linear";
  check_x(op, x);
  check_arg(op, "qweight", qweight, x, 3, ScalarType::Byte);
  const int64_t E = qweight.size(0), N = qweight.size(1), K = 2 * qweight.size(2);
  grouped::check_rows(op, x, expert_offsets, E, N, K, bias);
  check_arg(op, "scales", scales, x, 3, x.scalar_type());
  check_arg(op, "zeros", zeros, x, 3, x.scalar_type());
  STD_TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "reparam.grouped_int4_linear: `group_size` must be a positive multiple of 32");
  STD_TORCH_CHECK(K % group_size == 0, "reparam.grouped_int4_linear: `group_size` must divide in_features K");
  const int64_t G = K / group_size;
  for (const Tensor* t : {&scales, &zeros})
    STD_TORCH_CHECK(t->size(0) == E && t->size(1) == N && t->size(2) == G,
                    "reparam.grouped_int4_linear: `scales` and `zeros` must be [E, N, K / group_size]");
  return grouped::with_output(op, x, N, [&](auto tag, const Tensor& xc, Tensor& y, cudaStream_t stream) {
    using T = decltype(tag);
    const uint8_t* qp = static_cast<const uint8_t*>(qweight.data_ptr());
    const T* sp = static_cast<const T*>(scales.data_ptr());
    const T* zp = static_cast<const T*>(zeros.data_ptr());
    const bool pow2_group = (group_size & (group_size - 1)) == 0;
    const int shift = pow2_group ? ilog2(group_size) : -1;
    // the [E N, K / 2] stack: K % 32 == 0, so every row is 16-byte aligned when the base is
    grouped::linear<T>(Int4Frag<T>{qp, sp, zp, K, shift}, pow2_group && aligned16(qp),
                       Int4Dec<T>{qp, sp, zp, K, G, group_size, aligned16(qp), shift}, xc, expert_offsets, E, bias, y,
                       N, K, stream);
  });
}

}  // namespace reparam
