// Fused low-rank linear: y = x @ v^T @ u^T + bias, u [N, r], v [r, K].
//
// One cooperative (persistent) launch runs both products:
//   phase 0  zero the fp32 accumulators that split-L units add into
//   phase 1  t[M, r] = x @ v^T          (weights v as the tensor-core A operand)
//   -- grid barrier --
//   phase 2  y[M, N] = t @ u^T + bias   (u as A; t, rounded to x's dtype, as B)
//   -- grid barrier, only if phase 2 was split along r --
//   phase 3  y = y32 + bias, in x's dtype
// The r-wide intermediate t never leaves the chip's L2 in practice: it is a
// few KB (M * r fp32) written and read inside the same launch.
//
// Pivoted factors (op pivoted_lowrank_linear, csrc/pivoted_lowrank_linear.cu): W = u @ [I | w] @ P,
// w [r, K - r], perm [K]. Phase 0 then gathers x's non-pivot columns into a scratch xg [M, K - r]
// (so phase 1 streams it with the same 16-byte loads) and starts t at x's pivot columns; phase 1
// is t += xg @ w^T; phases 2-3 are unchanged.
//
// With REPARAM_LOWRANK_GEMV=1 (off until timed) both forms at M <= 8 first take lowrank_gemv.cuh's two GEMVs
// in one launch. From REPARAM_LOWRANK_CUBLAS_MIN_M on (by default every M for plain factors, M >= 2 for pivoted ones;
// measured on the H200, see lowrank_large_m.cuh) the ops take two cuBLAS products instead. Below the
// threshold (pivoted M = 1 by default, any M with it raised or 0),
// M <= 64 takes the register-fed tensor-core path of lowrank_small_m.cuh (one grid barrier; REPARAM_SMALL_M=0 turns it off); on Hopper the sizes
// between take wgmma (lowrank_wgmma.cuh; REPARAM_WGMMA=0 turns it off). What follows serves the
// rest. Decode (M <= 16) is memory-bound: the tile puts 64 weight rows against a
// 16-wide batch and the reduction is split so every SM streams weights
// (16-byte cp.async, two stages). Prefill uses 128x128 tiles.
#include <cooperative_groups.h>

#include "gemm_nt_tile.cuh"
#include "lowrank_gemv.cuh"
#include "lowrank_large_m.cuh"
#include "lowrank_product.h"
#include "lowrank_small_m.cuh"
#include "lowrank_wgmma.cuh"
#include "ops.h"

namespace reparam {
namespace {

namespace cg = cooperative_groups;

template <class T>
struct LowRankArgs {
  Operand<T> x, v, u;  // phase 1 operands x [M, K1], v [r, K1]; u [N, r]
  const T* bias;       // [N] or nullptr
  float* t32;          // [M, r]
  float* y32;          // [M, N], used when phase 2 is split
  T* y;                // [M, N]
  int64_t M, N, K, r;
  int64_t K1;          // reduction length of phase 1: K, or K - r when pivoted
  const T* xin;        // pivoted only: the input x [M, K] ...
  const int64_t* perm; // ... its column permutation [K] (pivots first), nullptr when not pivoted
  T* xg;               // ... and the gather scratch [M, K - r] that a.x points at
  int split1, split2;  // number of L ranges per tile in phases 1 and 2
};

// Work units of one phase: (P tile, Q tile, L range), enumerated P-fastest so
// concurrently running CTAs share the same activation tile in L2.
template <class Cfg>
struct Units {
  int64_t tp, tq, split, lchunk;
  __device__ Units(int64_t P, int64_t Q, int64_t L, int s)
      : tp((P + Cfg::BP - 1) / Cfg::BP), tq((Q + Cfg::BQ - 1) / Cfg::BQ), split(s) {
    const int64_t blocks = (L + Cfg::BL - 1) / Cfg::BL;
    lchunk = ((blocks + s - 1) / s) * Cfg::BL;
  }
  __device__ int64_t count() const { return tp * tq * split; }
};

template <class Cfg, class T>
__global__ void __launch_bounds__(Cfg::kThreads) lowrank_kernel(LowRankArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  cg::grid_group grid = cg::this_grid();
  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gthreads = int64_t(gridDim.x) * blockDim.x;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[Cfg::FP][Cfg::FQ];

  // phase 0
  const bool pivoted = a.perm != nullptr;
  if (pivoted) {
    const int64_t kr = a.K1;  // = K - r
    for (int64_t i = gtid; i < a.M * kr; i += gthreads) {
      const int64_t m = i / kr, l = i - m * kr;
      a.xg[i] = a.xin[m * a.K + a.perm[a.r + l]];
    }
    for (int64_t i = gtid; i < a.M * a.r; i += gthreads) {
      const int64_t m = i / a.r, j = i - m * a.r;
      a.t32[i] = to_f32<T>(a.xin[m * a.K + a.perm[j]]);  // the identity block of [I | w]
    }
  } else if (a.split1 > 1) {
    for (int64_t i = gtid; i < a.M * a.r; i += gthreads) a.t32[i] = 0.f;
  }
  if (a.split2 > 1)
    for (int64_t i = gtid; i < a.M * a.N; i += gthreads) a.y32[i] = 0.f;
  if (pivoted || a.split1 > 1) grid.sync();

  // phase 1: C[P = r, Q = M] = v @ x^T, stored as t[m, j] (added to t when pivoted)
  {
    Units<Cfg> U(a.r, a.M, a.K1, a.split1);
    for (int64_t w = blockIdx.x; w < U.count(); w += gridDim.x) {
      const int64_t ip = w % U.tp, iq = (w / U.tp) % U.tq, is = w / (U.tp * U.tq);
      const int64_t lb = is * U.lchunk, le = min(a.K1, lb + U.lchunk);
      if (lb >= le) continue;
      mma_unit<Cfg>(acc, smem, a.v, a.x, ip * Cfg::BP, iq * Cfg::BQ, lb, le);
      float* t32 = a.t32;
      const int64_t r = a.r;
      if (a.split1 > 1)
        emit_unit<Cfg>(acc, smem, a.r, a.M, ip * Cfg::BP, iq * Cfg::BQ,
                       [=](int64_t q, int64_t p, float v) { atomicAdd(t32 + q * r + p, v); });
      else if (pivoted)  // one unit per element: a plain add onto phase 0's value
        emit_unit<Cfg>(acc, smem, a.r, a.M, ip * Cfg::BP, iq * Cfg::BQ,
                       [=](int64_t q, int64_t p, float v) { t32[q * r + p] += v; });
      else
        emit_unit<Cfg>(acc, smem, a.r, a.M, ip * Cfg::BP, iq * Cfg::BQ,
                       [=](int64_t q, int64_t p, float v) { t32[q * r + p] = v; });
    }
  }
  grid.sync();

  // phase 2: C[P = N, Q = M] = u @ t^T, stored as y[m, n]
  {
    const Operand<float> t{a.t32, a.M, a.r, false};
    Units<Cfg> U(a.N, a.M, a.r, a.split2);
    for (int64_t w = blockIdx.x; w < U.count(); w += gridDim.x) {
      const int64_t ip = w % U.tp, iq = (w / U.tp) % U.tq, is = w / (U.tp * U.tq);
      const int64_t lb = is * U.lchunk, le = min(a.r, lb + U.lchunk);
      if (lb >= le) continue;
      mma_unit<Cfg>(acc, smem, a.u, t, ip * Cfg::BP, iq * Cfg::BQ, lb, le);
      const int64_t N = a.N;
      if (a.split2 > 1) {
        float* y32 = a.y32;
        emit_unit<Cfg>(acc, smem, a.N, a.M, ip * Cfg::BP, iq * Cfg::BQ,
                       [=](int64_t q, int64_t p, float v) { atomicAdd(y32 + q * N + p, v); });
      } else {
        T* y = a.y;
        const T* bias = a.bias;
        emit_unit<Cfg>(acc, smem, a.N, a.M, ip * Cfg::BP, iq * Cfg::BQ, [=](int64_t q, int64_t p, float v) {
          y[q * N + p] = from_f32<T>(v + (bias ? to_f32<T>(bias[p]) : 0.f));
        });
      }
    }
  }

  // phase 3
  if (a.split2 > 1) {
    grid.sync();
    for (int64_t i = gtid; i < a.M * a.N; i += gthreads)
      a.y[i] = from_f32<T>(a.y32[i] + (a.bias ? to_f32<T>(a.bias[i % a.N]) : 0.f));
  }
}

// Splits of the reduction so that a phase has about `target` work units.
template <class Cfg>
int choose_split(int64_t P, int64_t Q, int64_t L, int64_t target) {
  const int64_t tiles = ((P + Cfg::BP - 1) / Cfg::BP) * ((Q + Cfg::BQ - 1) / Cfg::BQ);
  const int64_t blocks = (L + Cfg::BL - 1) / Cfg::BL;
  if (tiles * 2 >= target) return 1;
  int64_t s = (target + tiles - 1) / tiles;
  return int(std::max<int64_t>(1, std::min(s, blocks)));
}

// Picks the grid (all co-resident CTAs: the grid barrier needs that), the
// reduction splits, allocates the fp32 scratch they need, and launches.
template <class Cfg, class T>
void launch(LowRankArgs<T> a, const Tensor& x, cudaStream_t stream) {
  auto kernel = lowrank_kernel<Cfg, T>;
  constexpr int smem = Cfg::template smem_bytes<T>();
  // Occupancy (and the smem opt-in) per device: GPUs of different kinds can share a process.
  static int blocks_per_sm[64] = {0};
  const int dev = x.get_device_index();
  STD_TORCH_CHECK(dev >= 0 && dev < 64, "reparam.lowrank_linear: device index out of range");
  if (blocks_per_sm[dev] == 0) {
    int nb = 0;
    RK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    RK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, Cfg::kThreads, smem));
    STD_TORCH_CHECK(nb > 0, "reparam.lowrank_linear: kernel does not fit on this GPU");
    blocks_per_sm[dev] = nb;
  }
  const int grid = blocks_per_sm[dev] * sm_count(dev);
  a.split1 = choose_split<Cfg>(a.r, a.M, a.K1, grid);
  a.split2 = choose_split<Cfg>(a.N, a.M, a.r, grid);
  Tensor t32 = torch::stable::new_empty(x, {a.M * a.r}, ScalarType::Float);
  Tensor y32 = torch::stable::new_empty(x, {a.split2 > 1 ? a.M * a.N : 1}, ScalarType::Float);
  a.t32 = static_cast<float*>(t32.data_ptr());
  a.y32 = static_cast<float*>(y32.data_ptr());
  void* params[] = {&a};
  RK_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(grid),
                                            dim3(Cfg::kThreads), params, smem, stream));
  // t32 / y32 are freed here; the caching allocator reuses them only for work
  // ordered after this launch on the same stream.
}

using DecodeCfg = TileCfg<64, 16, 64, 4, 1>;    // M <= 16
using MidCfg = TileCfg<64, 64, 32, 2, 2>;       // M <= 64
using PrefillCfg = TileCfg<128, 128, 32, 4, 2>;  // larger M

}  // namespace

// The low-rank product behind both ops: plain (perm == nullptr; v [r, K]) or pivoted (v is w [r, K - r],
// perm [K] int64). Declared in lowrank_product.h; argument names in errors are the calling op's.
Tensor lowrank_product(const char* op, Tensor x, Tensor u, Tensor v, const Tensor* perm,
                       std::optional<Tensor> bias) {
  check_x(op, x);
  check_arg(op, "u", u, x, 2, x.scalar_type());
  check_arg(op, "v", v, x, 2, x.scalar_type());
  const int64_t N = u.size(0), r = u.size(1), K1 = v.size(1);
  const int64_t K = perm ? r + K1 : K1;
  STD_TORCH_CHECK(v.size(0) == r, "reparam.", op, ": rank mismatch between `u` [N, r] and the right factor [r, ...]");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == K, "reparam.", op, ": `x` last dimension must equal K = ", K);
  STD_TORCH_CHECK(r > 0 && K > 0, "reparam.", op, ": rank r and in_features K must be positive");
  if (perm) {
    check_arg(op, "perm", *perm, x, 1, ScalarType::Long);
    STD_TORCH_CHECK(perm->size(0) == K, "reparam.", op, ": `perm` must have K = ", K, " entries");
  }
  check_bias(op, bias, x, N);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  const int64_t M = xc.numel() / K;
  Tensor y = torch::stable::new_empty(xc, out_shape(xc, N));
  if (M == 0 || N == 0) return y;
  cudaStream_t stream = current_stream(xc);
  if (lowrank_gemv::enabled()) {  // REPARAM_LOWRANK_GEMV=1: decode as two GEMVs, one launch
    bool done = false;
    dispatch_half(xc.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      done = lowrank_gemv::run<T>(static_cast<const T*>(xc.data_ptr()), static_cast<const T*>(v.data_ptr()),
                                  static_cast<const T*>(u.data_ptr()),
                                  perm ? static_cast<const int64_t*>(perm->data_ptr()) : nullptr,
                                  bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                                  static_cast<T*>(y.data_ptr()), M, N, K, r, xc, stream);
    });
    if (done) return y;
  }
  if (M >= lowrank_large_m::min_m(perm != nullptr)) {  // prefill: two cuBLAS products (lowrank_large_m.cuh)
    dispatch_half(xc.scalar_type(), op, [&](auto tag) {
      lowrank_large_m::run<decltype(tag)>(xc, u, v, perm, bias, y, M, N, K, r, stream);
    });
    return y;
  }
  const int64_t* pp = perm ? static_cast<const int64_t*>(perm->data_ptr()) : nullptr;
  dispatch_half(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(xc.data_ptr());
    const T* vp = static_cast<const T*>(v.data_ptr());
    const T* up = static_cast<const T*>(u.data_ptr());
    const T* bp = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    T* yp = static_cast<T*>(y.data_ptr());
    if (lowrank_wgmma::run<T>(xp, vp, up, pp, bp, yp, M, N, K, r, xc, stream)) return;  // from REPARAM_WGMMA_MIN_M
    if (lowrank_small_m::run<T>(xp, vp, up, pp, bp, yp, M, N, K, r, xc, stream)) return;
    // the WMMA kernel; the pivoted form's gather scratch (at least one element so its pointer is valid)
    Tensor xg = torch::stable::new_empty(xc, {perm ? std::max<int64_t>(M * K1, 1) : 1});
    LowRankArgs<T> a;
    T* xgp = static_cast<T*>(xg.data_ptr());
    const T* x1 = perm ? xgp : xp;  // phase 1 streams the gathered columns when pivoted
    a.x = {x1, M, K1, K1 % 8 == 0 && aligned16(x1)};
    a.v = {vp, r, K1, K1 % 8 == 0 && aligned16(vp)};
    a.u = {up, N, r, r % 8 == 0 && aligned16(up)};
    a.bias = bp;
    a.y = yp;
    a.M = M; a.N = N; a.K = K; a.r = r; a.K1 = K1;
    a.xin = xp;
    a.perm = pp;
    a.xg = xgp;
    if (M <= 16) {
      launch<DecodeCfg>(a, xc, stream);
    } else if (M <= 64) {
      launch<MidCfg>(a, xc, stream);
    } else {
      launch<PrefillCfg>(a, xc, stream);
    }
  });
  return y;
}

Tensor lowrank_linear_cuda(Tensor x, Tensor u, Tensor v, std::optional<Tensor> bias) {
  return lowrank_product("lowrank_linear", x, u, v, nullptr, bias);
}

}  // namespace reparam
