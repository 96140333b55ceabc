// grouped_lut_linear: a mixture-of-experts layer's 4-bit lookup-table experts (log or k-means 4-bit) in one launch
// (grouped_quant.cuh), rows expert_offsets[e] .. [e + 1] of x [T, K] through expert e. codes uint8 [E, N, K/2],
// lut [E, L, 16], bias [E, N]: each expert's layout as lut_linear.cu's.
//
// The stack [E N, K/2] of codes with the tables seen as [E L, 16] is one lut_linear layout: row e N + n takes
// table (e N + n) / (N / L) = e L + n / (N / L), expert e's table of its row n. So LutFrag (the row's table in
// registers, loaded once a work unit) and LutDec serve every expert unchanged.
#include "grouped_quant.cuh"
#include "lut_format.cuh"
#include "ops.h"

namespace reparam {

Tensor grouped_lut_linear_cuda(Tensor x, Tensor expert_offsets, Tensor codes, Tensor lut, std::optional<Tensor> bias) {
  const char* op = "grouped_lut_linear";
  check_x(op, x);
  check_arg(op, "codes", codes, x, 3, ScalarType::Byte);
  check_arg(op, "lut", lut, x, 3, x.scalar_type());
  const int64_t E = codes.size(0), N = codes.size(1), K = 2 * codes.size(2), L = lut.size(1);
  STD_TORCH_CHECK(lut.size(0) == E && lut.size(2) == 16, "reparam.grouped_lut_linear: `lut` must be [E, L, 16]");
  STD_TORCH_CHECK(L > 0 && N % L == 0, "reparam.grouped_lut_linear: the tables an expert L must divide N");
  grouped::check_rows(op, x, expert_offsets, E, N, K, bias);
  return grouped::with_output(op, x, N, [&](auto tag, const Tensor& xc, Tensor& y, cudaStream_t stream) {
    using T = decltype(tag);
    const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
    const T* lp = static_cast<const T*>(lut.data_ptr());
    const bool aligned = K % 32 == 0 && aligned16(cp) && aligned16(lp);  // 16-byte code rows, 32-byte tables
    const bool vec = (K / 2) % 16 == 0 && aligned16(cp);
    grouped::linear<T>(LutFrag<T>{cp, lp, K, N / L}, aligned, LutDec<T>{cp, lp, K, N / L, vec}, xc, expert_offsets, E,
                       bias, y, N, K, stream);
  });
}

}  // namespace reparam
