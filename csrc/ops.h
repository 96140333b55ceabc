// Declarations of the CUDA implementations bound in torch_bindings.cpp.
// One line per op; the schemas live in reparam_kernels/schemas.py.
#pragma once
#include <optional>

#include <torch/csrc/stable/tensor.h>

namespace reparam {
using torch::stable::Tensor;

Tensor lowrank_linear_cuda(Tensor x, Tensor u, Tensor v, std::optional<Tensor> bias);
Tensor block_circulant_linear_cuda(Tensor x, Tensor w_spectrum, int64_t block_size, int64_t out_features, std::optional<Tensor> bias);
Tensor toeplitz_linear_cuda(Tensor x, Tensor t_spectrum, int64_t fft_size, int64_t out_features, std::optional<Tensor> bias);

}  // namespace reparam
