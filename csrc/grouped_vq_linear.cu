// grouped_vq_linear: a mixture-of-experts layer's vector-quantized experts (GPTVQ) in one launch
// (grouped_quant.cuh), rows expert_offsets[e] .. [e + 1] of x [T, K] through expert e. codes uint8 [E, N, K/d],
// codebooks [E, L, C <= 256, d], bias [E, N]: each expert's layout as vq_linear.cu's.
//
// The stack [E N, K/d] of codes with the codebooks seen as [E L, C, d] is one vq_linear layout: its row e N + n
// takes codebook (e N + n) / (N / L) = e L + n / (N / L), expert e's codebook of row n. So the formats' decoders
// serve every expert unchanged: pairs (d = 2) take the small-M loop with VqPairFrag (each CTA stages its column
// block's codebooks of its expert in shared memory), every other d the fallback kernel with VqDec.
#include "grouped_quant.cuh"
#include "ops.h"
#include "vq_format.cuh"

namespace reparam {

Tensor grouped_vq_linear_cuda(Tensor x, Tensor expert_offsets, Tensor codes, Tensor codebooks,
                              std::optional<Tensor> bias) {
  const char* op = "grouped_vq_linear";
  check_x(op, x);
  check_arg(op, "codes", codes, x, 3, ScalarType::Byte);
  check_arg(op, "codebooks", codebooks, x, 4, x.scalar_type());
  const int64_t E = codes.size(0), N = codes.size(1);
  const int64_t L = codebooks.size(1), C = codebooks.size(2), d = codebooks.size(3);
  STD_TORCH_CHECK(1 <= d && d <= 8 && 1 <= C && C <= 256,
                  "reparam.grouped_vq_linear: `codebooks` must be [E, L, C, d] with C <= 256 entries and d in 1..8");
  STD_TORCH_CHECK(codebooks.size(0) == E,
                  "reparam.grouped_vq_linear: `codes` and `codebooks` must hold the same experts");
  STD_TORCH_CHECK(L > 0 && N % L == 0, "reparam.grouped_vq_linear: the codebooks an expert L must divide N");
  const int64_t K = d * codes.size(2);
  grouped::check_rows(op, x, expert_offsets, E, N, K, bias);
  return grouped::with_output(op, x, N, [&](auto tag, const Tensor& xc, Tensor& y, cudaStream_t stream) {
    using T = decltype(tag);
    const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
    const T* bp = static_cast<const T*>(codebooks.data_ptr());
    const int64_t rpb = N / L, len = K / d;
    // pairs: 16-byte code rows of the stack (K % 32 == 0) and 4-byte entries; books_fit_slots sees one
    // expert's blocks (e N is a multiple of N / L, so the stack's codebook boundaries are each expert's)
    const bool pairs = d == 2 && K % 32 == 0 && aligned16(cp) && reinterpret_cast<uintptr_t>(bp) % 4 == 0 &&
                       books_fit_slots(L, rpb) && pairs_small_m_enabled();
    const bool vec = aligned16(cp) && ((d == 1 && len % 16 == 0) || (d == 2 && len % 8 == 0));
    grouped::linear<T>(VqPairFrag<T>{cp, bp, K, rpb, E * L, C}, pairs, VqDec<T>{cp, bp, K, rpb, C * d, int(d), vec},
                       xc, expert_offsets, E, bias, y, N, K, stream);
  });
}

}  // namespace reparam
