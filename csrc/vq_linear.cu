// vq_linear: y = x @ W^T + bias, W[n, k] = codebooks[n / (N / L), codes[n, k / d], k % d].
// codes uint8 [N, K/d] (one code per sub-vector of d consecutive inputs), codebooks [L, E <= 256, d] in
// x's dtype, L dividing N; d = 1..8.
//
// Two paths. Pairs (d = 2, GPTVQ's format) at M <= 64 take the register-fed tensor-core loop of
// small_m_gemm.cuh (VqPairFrag): a code is one pair of consecutive k, which is exactly one 32-bit B
// register of mma.m16n8k16, so decoding is one shared-memory lookup per code. Everything else (any d,
// any M, rows not 16-byte aligned) takes the general dequantizing path (quant_dequant_mm.cuh:
// dequantize + cuBLAS from M = 256, GEMV / WMMA tiles below) with VqDec, which reads entries through
// the read-only cache.
#include <cstdlib>

#include "ops.h"
#include "quant_dequant_mm.cuh"
#include "quant_gemm.cuh"
#include "small_m_launch.cuh"
#include "vq_format.cuh"

namespace reparam {

Tensor vq_linear_cuda(Tensor x, Tensor codes, Tensor codebooks, std::optional<Tensor> bias) {
  const char* op = "vq_linear";
  check_x(op, x);
  check_arg(op, "codes", codes, x, 2, ScalarType::Byte);
  check_arg(op, "codebooks", codebooks, x, 3, x.scalar_type());
  const int64_t L = codebooks.size(0), E = codebooks.size(1), d = codebooks.size(2);
  STD_TORCH_CHECK(1 <= d && d <= 8 && 1 <= E && E <= 256,
                  "reparam.vq_linear: `codebooks` must be [L, E, d] with E <= 256 entries and d in 1..8");
  const int64_t N = codes.size(0), K = d * codes.size(1);
  STD_TORCH_CHECK(K > 0, "reparam.vq_linear: in_features K must be positive");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.vq_linear: `x` last dimension must equal K = d * codes.shape[1]");
  STD_TORCH_CHECK(L > 0 && N % L == 0, "reparam.vq_linear: the number of codebooks L must divide N");
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
    const T* bp = static_cast<const T*>(codebooks.data_ptr());
    const T* xp = static_cast<const T*>(xc.data_ptr());
    const T* biasp = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    const int64_t rpb = N / L;
    // 16-byte code rows (K % 32 == 0), 4-byte entries
    const bool aligned = K % 32 == 0 && aligned16(cp) && reinterpret_cast<uintptr_t>(bp) % 4 == 0;
    if (d == 2 && books_fit_slots(L, rpb) && pairs_small_m_enabled() &&
        small_m::linear_small_m(VqPairFrag<T>{cp, bp, K, rpb, L, E}, aligned, xp, biasp, static_cast<T*>(y.data_ptr()),
                                M, N, K, xc, stream))
      return;
    const int64_t len = K / d;
    const bool vec = aligned16(cp) && ((d == 1 && len % 16 == 0) || (d == 2 && len % 8 == 0));
    quant::general_linear<VqDec<T>, T>(VqDec<T>{cp, bp, K, rpb, E * d, int(d), vec}, xc, bias, y, M, N, K, stream);
  });
  return y;
}

}  // namespace reparam
