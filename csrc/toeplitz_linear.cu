// Toeplitz linear through its L x L circulant embedding (L = fft_size): the
// fused block-circulant kernel with one L x L block (x zero-padded to L, the
// first out_features outputs kept). See csrc/block_circulant_linear.cu.
#include "common.cuh"
#include "ops.h"

namespace reparam {

Tensor toeplitz_linear_cuda(Tensor x, Tensor t_spectrum, int64_t fft_size, int64_t out_features,
                            std::optional<Tensor> bias) {
  STD_TORCH_CHECK(fft_size >= 64 && fft_size <= 4096 && (fft_size & (fft_size - 1)) == 0,
                  "reparam.toeplitz_linear: the CUDA kernel takes `fft_size` a power of two in 64..4096, got ",
                  fft_size, " (reparam_kernels.ops.toeplitz_linear routes other sizes to Triton)");
  STD_TORCH_CHECK(t_spectrum.dim() == 4 && t_spectrum.size(0) == 1 && t_spectrum.size(1) == 1,
                  "reparam.toeplitz_linear: `t_spectrum` must be [1, 1, 2, fft_size/2+1]");
  return block_circulant_linear_cuda(x, t_spectrum, fft_size, out_features, bias);
}

}  // namespace reparam
