// Pivoted low-rank linear, y = (x[:, perm[:r]] + x[:, perm[r:]] @ w^T) @ u^T + bias: the fused low-rank
// kernel with its pivoted phase 0 (x's non-pivot columns gathered, t started at the pivot columns).
// See csrc/lowrank_linear.cu.
#include "lowrank_product.h"
#include "ops.h"

namespace reparam {

Tensor pivoted_lowrank_linear_cuda(Tensor x, Tensor u, Tensor w, Tensor perm, std::optional<Tensor> bias) {
  return lowrank_product("pivoted_lowrank_linear", x, u, w, &perm, bias);
}

}  // namespace reparam
