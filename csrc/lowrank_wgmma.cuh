// The low-rank ops between decode and prefill on Hopper (REPARAM_WGMMA_MIN_M <= M <
// REPARAM_LOWRANK_CUBLAS_MIN_M): both products through quant_wgmma.cuh's wgmma GEMM with plain
// fp16/bf16 factors as the register operand (HalfFrag: a lane's 16-byte load of a factor row is
// its A registers as they are):
//   t [M, r] = x @ v^T          (pivoted: PivotFrag gathers x's non-pivot columns in the slot-order
//                                pass and adds the pivot columns in the epilogue)
//   y [M, N] = t @ u^T + bias
// Four launches (a slot-order pass before each GEMM), t in x's dtype in global memory (M * r
// elements, L2-resident), as the decode path rounds it. Against the WMMA kernel of
// lowrank_linear.cu, which it replaces there: wgmma instead of mma.sync, no grid barriers.
// Requirements (else the caller takes the WMMA kernel): sm_90, REPARAM_WGMMA not "0", the
// reduction lengths (K or K - r, and r) multiples of 8, x (plain only), v and u 16-byte aligned.
#pragma once

#include "lowrank_large_m.cuh"
#include "quant_wgmma.cuh"

namespace reparam {
namespace lowrank_wgmma {

template <class T>
bool run(const T* x, const T* v, const T* u, const int64_t* perm, const T* bias, T* y, int64_t M, int64_t N,
         int64_t K, int64_t r, const Tensor& like, cudaStream_t stream) {
  const int64_t K1 = perm ? K - r : K;  // the first product's reduction length
  const int64_t top = lowrank_large_m::min_m(perm != nullptr);  // M from here on takes two cuBLAS GEMMs
  if (!quant_wgmma::applies(M, top, like) || K1 < 8 || K1 % 8 != 0 || r % 8 != 0 || K >= small_m::kMaxK) return false;
  if (!small_m::rows_fit32(r, K1) || !small_m::rows_fit32(N, r)) return false;  // both products' rows
  if (!aligned16(v) || !aligned16(u) || (!perm && !aligned16(x))) return false;
  Tensor t = torch::stable::new_empty(like, {M * r});
  T* tp = static_cast<T*>(t.data_ptr());
  using Half = small_m::HalfFrag<T>;
  const bool first = perm ? quant_wgmma::linear_wgmma(small_m::PivotFrag<T>{{v, K1}, x, perm, K, r}, true, x,
                                                      static_cast<const T*>(nullptr), tp, M, r, K1, top, like, stream)
                          : quant_wgmma::linear_wgmma(Half{v, K}, true, x, static_cast<const T*>(nullptr), tp, M, r,
                                                      K, top, like, stream);
  if (!first) return false;  // no sm_90a code in this build: nothing was launched
  STD_TORCH_CHECK(quant_wgmma::linear_wgmma(Half{u, r}, true, static_cast<const T*>(tp), bias, y, M, N, r, top,
                                            like, stream),
                  "reparam: the low-rank wgmma path refused its second product after running the first");
  return true;  // t is freed here; the caching allocator reuses it only after these launches
}

}  // namespace lowrank_wgmma
}  // namespace reparam
