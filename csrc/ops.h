// Declarations of the CUDA implementations bound in torch_bindings.cpp.
// One line per op; the schemas live in reparam_kernels/schemas.py.
#pragma once
#include <optional>

#include <torch/csrc/stable/tensor.h>

namespace reparam {
using torch::stable::Tensor;

Tensor lowrank_linear_cuda(Tensor x, Tensor u, Tensor v, std::optional<Tensor> bias);
Tensor pivoted_lowrank_linear_cuda(Tensor x, Tensor u, Tensor w, Tensor perm, std::optional<Tensor> bias);
Tensor int8_linear_cuda(Tensor x, Tensor qweight, Tensor scales, std::optional<Tensor> bias);
Tensor int4_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int64_t group_size, std::optional<Tensor> bias);
Tensor grouped_int8_linear_cuda(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales, std::optional<Tensor> bias);
Tensor grouped_int4_linear_cuda(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales, Tensor zeros, int64_t group_size, std::optional<Tensor> bias);
Tensor grouped_lowrank_linear_cuda(Tensor x, Tensor expert_offsets, Tensor u, Tensor v, std::optional<Tensor> perm, Tensor factor_offsets, int64_t out_features, int64_t max_rank, int64_t row_align, std::optional<Tensor> bias);
Tensor grouped_lut_linear_cuda(Tensor x, Tensor expert_offsets, Tensor codes, Tensor lut, std::optional<Tensor> bias);
Tensor grouped_vq_linear_cuda(Tensor x, Tensor expert_offsets, Tensor codes, Tensor codebooks, std::optional<Tensor> bias);
Tensor lut_linear_cuda(Tensor x, Tensor codes, Tensor lut, std::optional<Tensor> bias);
Tensor vq_linear_cuda(Tensor x, Tensor codes, Tensor codebooks, std::optional<Tensor> bias);
Tensor block_circulant_linear_cuda(Tensor x, Tensor w_spectrum, int64_t block_size, int64_t out_features, std::optional<Tensor> bias);
Tensor block_circulant_cols_linear_cuda(Tensor x, Tensor w_cols, int64_t out_features, std::optional<Tensor> bias);
Tensor toeplitz_linear_cuda(Tensor x, Tensor t_spectrum, int64_t fft_size, int64_t out_features, std::optional<Tensor> bias);

}  // namespace reparam
