// Binds the CUDA kernels to the ops declared in reparam_kernels/schemas.py.
// Only implementations live here: the schemas are defined from Python so that
// the ops exist (with reference/Triton backends) even without this extension.
#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY_IMPL(reparam, CUDA, m) {
  m.impl("lowrank_linear", TORCH_BOX(&reparam::lowrank_linear_cuda));
  m.impl("pivoted_lowrank_linear", TORCH_BOX(&reparam::pivoted_lowrank_linear_cuda));
  m.impl("int8_linear", TORCH_BOX(&reparam::int8_linear_cuda));
  m.impl("int4_linear", TORCH_BOX(&reparam::int4_linear_cuda));
  m.impl("grouped_int8_linear", TORCH_BOX(&reparam::grouped_int8_linear_cuda));
  m.impl("grouped_int4_linear", TORCH_BOX(&reparam::grouped_int4_linear_cuda));
  m.impl("grouped_lowrank_linear", TORCH_BOX(&reparam::grouped_lowrank_linear_cuda));
  m.impl("grouped_lut_linear", TORCH_BOX(&reparam::grouped_lut_linear_cuda));
  m.impl("grouped_vq_linear", TORCH_BOX(&reparam::grouped_vq_linear_cuda));
  m.impl("lut_linear", TORCH_BOX(&reparam::lut_linear_cuda));
  m.impl("vq_linear", TORCH_BOX(&reparam::vq_linear_cuda));
  m.impl("block_circulant_linear", TORCH_BOX(&reparam::block_circulant_linear_cuda));
  m.impl("block_circulant_cols_linear", TORCH_BOX(&reparam::block_circulant_cols_linear_cuda));
  m.impl("toeplitz_linear", TORCH_BOX(&reparam::toeplitz_linear_cuda));
}
