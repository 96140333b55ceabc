// The fused low-rank product shared by lowrank_linear and pivoted_lowrank_linear
// (defined in csrc/lowrank_linear.cu; see the comment there).
#pragma once
#include <optional>

#include <torch/csrc/stable/tensor.h>

namespace reparam {
using torch::stable::Tensor;

// perm == nullptr: y = x @ v^T @ u^T + bias (v [r, K]); else v is w [r, K - r] of W = u @ [I | w] @ P
// and perm [K] (int64) the column permutation, pivots first. `op` names the op in error messages.
Tensor lowrank_product(const char* op, Tensor x, Tensor u, Tensor v, const Tensor* perm, std::optional<Tensor> bias);

}  // namespace reparam
