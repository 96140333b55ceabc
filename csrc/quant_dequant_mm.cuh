// Large-M path of the quantized ops: dequantize W into x's dtype (one
// bandwidth-bound pass: read the packed weight, write N x K halves), then
// cuBLAS through aten::linear.out straight into y (the bias in its epilogue).
// Rows of W go a piece at a time where the whole weight would exceed a scratch
// budget (dequant_chunk_rows below): each piece's GEMM writes its columns of y.
//
// Why: at large M the GEMM is compute-bound and the extra pass is small beside
// it (8192 x 8192 at M = 2048: ~45 us of dequantization vs ~400 us of GEMM at
// cuBLAS's 680 TFLOP/s, i.e. ~0.9x of cuBLAS on the dense weight), while
// quant_gemm.cuh's WMMA tiles (mma.sync, 2 stages, no wgmma) would run at a
// fraction of cuBLAS's Hopper kernels. The cost is a temporary buffer from the
// caching allocator: until 2026-12-06 the whole N x K weight (128 MB for 8192 x 8192
// fp16, 448 MB for 28672 x 8192, 2 GB for a 128256-row lm_head), now at most
// REPARAM_DEQUANT_SCRATCH_MB (default 256) unless a piece that size would leave SMs idle.
//
// Taken for M >= REPARAM_DEQUANT_MIN_M (default 129; 0 turns it off; 256 until the third H200 run). From the first H200 run
// (benchmarks/results/h200/*_linear.json, CUDA graph, 8192 x 8192): at M = 2048 this path costs cuBLAS
// plus 96 / 61 / 119 us (int4 / int8 / lut: the dequantization pass), and at M = 256 cuBLAS takes 57 us
// while the wgmma path took 190-193 us, so this path's predicted 153 / 118 / 177 us wins there; at M = 64
// (cuBLAS 37 us) the small-M path's 90 / 69 / 86 us beats its 133 / 98 / 156. The crossover between 64 and
// 256 is not measured yet (bench_quant's peers cuda_dequant_cublas / cuda_wgmma time both sides).
// The third run (2026-12-04, same shape, after the wgmma rework): this path 110 / 104 / 107 us at M = 256
// against wgmma's 178 / 190 / 178 (cuBLAS 57), and Nsight Compute timed one wgmma M tile (BM = 128,
// M = 128) at 128 us with the SM clock locked at 1.35 GHz (~87 us at 1.98): wgmma's time goes by M tiles,
// each re-reading every weight, so M = 129..255 (two tiles, like 256) costs what 256 does while this
// path costs at most its 256 time. From 129 on it is taken; 65..128 (one tile, ~87 us, against ~93 here
// predicted) stays wgmma. Inferred from those two points, not timed at M = 129..255 directly.
#pragma once

#include "cublas_mm.cuh"
#include "quant_gemm.cuh"

namespace reparam {
namespace quant {

inline int64_t dequant_min_m() { return min_m_from_env("REPARAM_DEQUANT_MIN_M", 129); }

// The scratch budget in bytes (REPARAM_DEQUANT_SCRATCH_MB, fractions allowed; 0 or negative: none, the
// whole weight at once as before 2026-12-06). Default 256 MB: 8192 x 8192 fp16 (128 MB) still goes in one
// piece, 28672 x 8192 (448 MB) in two. A budget the L2 holds (e.g. 16) keeps each piece in L2 between its
// dequantization and its GEMM, so neither writes the dense weight to DRAM nor reads it back: bench_quant's
// peer cuda_dequant_l2 times that (untimed so far).
inline double dequant_scratch_bytes() {
  const char* v = std::getenv("REPARAM_DEQUANT_SCRATCH_MB");
  const double mb = (v == nullptr || v[0] == '\0') ? 256.0 : std::atof(v);
  return mb > 0 ? mb * 1048576.0 : 0.0;
}

// Rows of W dequantized at once for y[M, N] = x[M, K] W^T with T of `elem` bytes on `sms` SMs: N (one
// piece) when the weight fits `budget` bytes (0: no budget); else pieces of equal rows, a multiple of
// 128, about the budget's rows, but never so few that a piece's GEMM has fewer 128 x 128 output tiles than
// SMs (a GEMM that leaves SMs idle costs more than the memory saves). The last piece may be shorter.
inline int64_t dequant_chunk_rows(int64_t M, int64_t N, int64_t K, int64_t elem, int64_t sms, double budget) {
  const double row_bytes = double(K) * double(elem);
  if (budget <= 0 || double(N) * row_bytes <= budget) return N;
  const int64_t budget_rows = std::max<int64_t>(128, int64_t(budget / row_bytes) / 128 * 128);
  const int64_t m_tiles = std::max<int64_t>(1, (M + 127) / 128);
  const int64_t fill_rows = 128 * ((std::max<int64_t>(1, sms) + m_tiles - 1) / m_tiles);
  const int64_t cap = std::max(budget_rows, fill_rows);
  if (cap >= N) return N;
  const int64_t pieces = (N + cap - 1) / cap;  // equal pieces no larger than cap, rounded up to 128 rows
  return std::min<int64_t>(N, ((N + pieces - 1) / pieces + 127) / 128 * 128);
}

// W[n, k] in T for every n < N, k < K. A CTA takes a row at a time; a thread decodes one unit of 8 weights
// (16 output bytes) at a time, units t, t + 256, ... of the row, kUnroll of them with their loads issued
// first. A warp's stores are then 512 contiguous bytes, whole sectors. (Until 2026-11-30 a thread decoded a
// whole 16-byte chunk of packed weights, 32 int4 weights, and wrote them as four 16-byte stores 64 bytes
// apart across the warp: every store instruction wrote 32 half sectors; the pass ran at ~1.7 TB/s.) The
// KC / 8 units of a packed chunk are neighbouring lanes loading the same 16 bytes, which L1 merges. Rows
// of fewer than 256 units leave threads idle: at the sizes this path serves (M >= 256) K is in the
// thousands. No index division: ~100 warp instructions per 512 output bytes (int4 fp16, sm_90a SASS: an
// issue ceiling near 6.7 TB/s of reads and writes), against ~250 per 2048 in the chunk-per-thread loop.
// Rows n0 .. n0 + rows - 1 of W go to w[0 .. rows - 1].
template <class Dec, class T>
__global__ void __launch_bounds__(256) dequantize_kernel(Dec dec, T* __restrict__ w, int64_t n0, int64_t rows,
                                                         int64_t K) {
  constexpr int kUnitsPerChunk = Dec::KC / 8, kUnroll = 4;
  const int64_t units = (K + 7) / 8;
  const bool vec = K % 8 == 0;  // then rows start 16-byte aligned (a fresh buffer)
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = n0 + r;
    T* row = w + r * K;
    for (int64_t u0 = threadIdx.x; u0 < units; u0 += kUnroll * blockDim.x) {
      uint4 raw[kUnroll];
      typename Dec::Params prm[kUnroll];
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {  // all loads first; a unit past the row's end loads the last one
        const int64_t u = u0 + i * blockDim.x < units ? u0 + i * blockDim.x : units - 1;
        const int64_t k0 = u / kUnitsPerChunk * Dec::KC;
        raw[i] = dec.load(n, k0);
        prm[i] = dec.params(n, k0);
      }
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        const int64_t u = u0 + i * blockDim.x;
        if (u >= units) break;
        float v[8];
        dec.decode8(raw[i], prm[i], int(u % kUnitsPerChunk), v);
        if (vec) {
          Vec8<T> o;
          T* p = reinterpret_cast<T*>(&o.raw);
#pragma unroll
          for (int e = 0; e < 8; ++e) p[e] = from_f32<T>(v[e]);
          *reinterpret_cast<uint4*>(row + 8 * u) = o.raw;
        } else {
          for (int e = 0; e < 8 && 8 * u + e < K; ++e) row[8 * u + e] = from_f32<T>(v[e]);
        }
      }
    }
  }
}

// y[..., N] = x[..., K] @ W^T + bias with W decoded by `dec`; xc contiguous, y fresh and contiguous.
// A piece of rows at a time (dequant_chunk_rows): its GEMM writes y's columns n0 .. n0 + rows - 1 through a
// strided view (cuBLAS takes the leading dimension N; with a bias aten copies it into the view first, as
// its fused-bias epilogue wants a contiguous output), one scratch buffer reused by every piece.
template <class Dec, class T>
void dequant_matmul(const Dec& dec, const Tensor& xc, const std::optional<Tensor>& bias, const Tensor& y, int64_t M,
                    int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t sms = sm_count(xc.get_device_index());
  const int64_t rows = dequant_chunk_rows(M, N, K, int64_t(sizeof(T)), sms, dequant_scratch_bytes());
  Tensor w = torch::stable::new_empty(xc, {rows, K});
  Tensor x2 = torch::stable::reshape(xc, {M, K});
  Tensor y2 = torch::stable::reshape(y, {M, N});
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t r = std::min(rows, N - n0);
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min(r, 16 * sms)));  // a row a CTA at a time
    dequantize_kernel<Dec, T><<<blocks, 256, 0, stream>>>(dec, static_cast<T*>(w.data_ptr()), n0, r, K);
    RK_CUDA_CHECK(cudaGetLastError());
    if (r == N) {  // one piece: y itself, the bias in cuBLAS's epilogue
      linear_out(x2, w, bias, y2);
      break;
    }
    std::optional<Tensor> b;
    if (bias.has_value()) {
      Tensor bb = *bias;
      b = torch::stable::narrow(bb, 0, n0, r);
    }
    linear_out(x2, r == rows ? w : torch::stable::narrow(w, 0, 0, r), b, torch::stable::narrow(y2, 1, n0, r));
  }
}

// The general path for any M (what the ops run when the small-M path does not apply):
// dequantize + cuBLAS from dequant_min_m() on, quant_gemm.cuh's GEMV / WMMA tiles below.
template <class Dec, class T>
void general_linear(const Dec& dec, const Tensor& xc, const std::optional<Tensor>& bias, const Tensor& y, int64_t M,
                    int64_t N, int64_t K, cudaStream_t stream) {
  if (M >= dequant_min_m()) return dequant_matmul<Dec, T>(dec, xc, bias, y, M, N, K, stream);
  quant_linear(dec, static_cast<const T*>(xc.data_ptr()),
               bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()),
               M, N, K, xc, stream);
}

}  // namespace quant
}  // namespace reparam
