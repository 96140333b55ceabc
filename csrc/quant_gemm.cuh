// Dequantizing GEMM shared by int8_linear, int4_linear and lut_linear:
// y[M, N] = x[M, K] @ W[N, K]^T + bias, with W decoded on the fly from a
// packed format. Each format is a "decoder" (see the .cu files) with
//   KC                 weights per 16-byte chunk of a packed row (16 or 32)
//   load(n, k0)        the raw 16 bytes holding W[n, k0 .. k0+KC) (k0 % KC == 0),
//                      bounds-checked (bytes beyond K read as 0; n must be < N, k0 < K)
//   Params params(n, k0)   what decoding needs besides the codes (scale, zero, table)
//   decode8(raw, p, j, w[8])  weights k0 + 8j .. k0 + 8j + 7 as fp32
// Weights beyond K decode to some finite value; x is zero there, so they add 0.
//
// Two paths, chosen by M:
// * GEMV (M <= 8, decode): memory-bound. A CTA of 8 warps owns 32 output rows
//   (4 per warp) and a K slice of KTILE inputs; gridDim.y = ceil(K / KTILE)
//   splits the reduction so every SM streams weights even when N is small.
//   x[:, slice] is staged in shared memory in a lane-major layout (lane l reads
//   chunk l's 16-byte vectors: consecutive addresses, no bank conflicts); each
//   lane issues 16-byte weight loads for its 4 rows before decoding them (4
//   loads in flight per lane), dequantizes in registers and accumulates in
//   fp32; a warp shuffle reduces over K.
// * Tensor cores (M > 8): CTA tile BP x BQ x BL through WMMA 16x16x16 (fp32
//   accumulate). Weight chunks are loaded into registers one stage ahead,
//   decoded to x's dtype and stored in shared memory (the A operand); x tiles
//   come by cp.async (the B operand, gemm_nt_tile.cuh's loader). The K range is
//   split when there are too few tiles to fill the GPU.
// Split reductions write fp32 partials [split, M, N]; a second small kernel
// sums them and adds the bias (deterministic, no atomics, graph-capturable).
#pragma once

#include "gemm_nt_tile.cuh"

namespace reparam {
namespace quant {

constexpr int KTILE = 1024;  // K slice of one GEMV CTA (multiple of 16 and 32)
constexpr int GEMV_WARPS = 8;
constexpr int GEMV_ROWS = 4;  // rows per warp

// fp32 value of a byte b (0..255) without I2F: 2^23 + b as a float bit pattern.
__device__ __forceinline__ float byte_to_float(uint32_t word, int byte_index) {
  const uint32_t bits = __byte_perm(word, 0x4B000000u, 0x7440u + byte_index);
  return __uint_as_float(bits) - 8388608.f;
}

template <class T>
struct Vec8 {  // 8 elements of T in 16 bytes
  uint4 raw;
  __device__ __forceinline__ float get(int i) const {
    const T* p = reinterpret_cast<const T*>(&raw);
    return to_f32<T>(p[i]);
  }
};

// Reads 16 bytes at `p` (16-byte aligned) through the read-only path.
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The 16 bytes [off, off+16) of a row of `len` bytes, zero beyond len; vectorized when allowed.
__device__ __forceinline__ uint4 load_row_bytes(const uint8_t* row, int64_t off, int64_t len, bool vec) {
  if (vec && off + 16 <= len) return ldg16(row + off);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  for (int i = 0; i < 16; ++i)
    if (off + i < len) w[i / 4] |= uint32_t(row[off + i]) << (8 * (i % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ------------------------------------------------------------------ GEMV (M <= 8)

template <class Dec, class T, int MM>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(Dec dec, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                float* __restrict__ part, int M, int64_t N, int64_t K) {
  constexpr int KC = Dec::KC;
  constexpr int NCH = KTILE / KC;  // chunks per K slice
  constexpr int SUB = KC / 8;      // 16-byte x vectors per chunk
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [MM][SUB][NCH][8]

  const int64_t kb = int64_t(blockIdx.y) * KTILE;
  const int kl = K - kb < KTILE ? int(K - kb) : KTILE;
  // Stage x[:, kb : kb + KTILE] (zero beyond K) in the lane-major layout.
  for (int i = threadIdx.x; i < MM * KTILE; i += blockDim.x) {
    const int m = i / KTILE, k = i % KTILE;
    const int c = k / KC, j = (k % KC) / 8, e = k % 8;
    const float v = (m < M && k < kl) ? to_f32<T>(x[int64_t(m) * K + kb + k]) : 0.f;
    xs[((m * SUB + j) * NCH + c) * 8 + e] = from_f32<T>(v);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * GEMV_WARPS + warp) * GEMV_ROWS;
  const int rows = int(min(int64_t(GEMV_ROWS), N - n0));  // may be <= 0 for the last CTA's warps
  float acc[MM][GEMV_ROWS];
#pragma unroll
  for (int m = 0; m < MM; ++m)
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) acc[m][r] = 0.f;

  for (int c = lane; c * KC < kl; c += 32) {
    const int64_t k0 = kb + int64_t(c) * KC;
    uint4 raw[GEMV_ROWS];
    typename Dec::Params prm[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {  // all loads first: GEMV_ROWS 16-byte loads in flight
      raw[r] = r < rows ? dec.load(n0 + r, k0) : make_uint4(0u, 0u, 0u, 0u);
      if (r < rows) prm[r] = dec.params(n0 + r, k0);
    }
    // Per 8-weight sub-vector j: x is read from shared memory and converted once,
    // then used by every row of the warp.
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
      float xf[MM][8];
#pragma unroll
      for (int m = 0; m < MM; ++m) {
        Vec8<T> xv;
        xv.raw = *reinterpret_cast<const uint4*>(xs + ((m * SUB + j) * NCH + c) * 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) xf[m][e] = xv.get(e);  // rows m >= M were staged as 0
      }
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r >= rows) break;
        float w[8];
        dec.decode8(raw[r], prm[r], j, w);
#pragma unroll
        for (int m = 0; m < MM; ++m)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(w[e], xf[m][e], acc[m][r]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MM; ++m)
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t n = n0 + r;
      if (lane == 0 && m < M && n < N) {
        if (gridDim.y == 1)
          y[int64_t(m) * N + n] = from_f32<T>(v + (bias ? to_f32<T>(bias[n]) : 0.f));
        else
          part[(int64_t(blockIdx.y) * M + m) * N + n] = v;
      }
    }
}

// y = sum over splits of part + bias.
template <class T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, const T* __restrict__ bias,
                                     T* __restrict__ y, int splits, int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = bias ? to_f32<T>(bias[i % N]) : 0.f;
    for (int s = 0; s < splits; ++s) v += part[s * total + i];
    y[i] = from_f32<T>(v);
  }
}

// ------------------------------------------------------------------ tensor cores (M > 8)

template <class Cfg, class Dec>
struct ALoader {
  static constexpr int KC = Dec::KC;
  static_assert(Cfg::BL % KC == 0, "BL must hold whole chunks");
  static constexpr int CPR = Cfg::BL / KC;  // chunks per tile row
  static constexpr int TOTAL = Cfg::BP * CPR;
  static constexpr int CPT = (TOTAL + Cfg::kThreads - 1) / Cfg::kThreads;  // chunks per thread
  uint4 raw[CPT];

  // Chunks of rows n >= N or starting at k >= K are not read (decoded as 0): their
  // scale / table index may not exist.
  __device__ __forceinline__ void fetch(const Dec& dec, int64_t N, int64_t K, int64_t p0, int64_t l0) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * Cfg::kThreads;
      const int64_t n = p0 + c / CPR, k0 = l0 + (c % CPR) * KC;
      raw[i] = (c < TOTAL && n < N && k0 < K) ? dec.load(n, k0) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  template <class T>
  __device__ __forceinline__ void store(const Dec& dec, T* As, int64_t N, int64_t K, int64_t p0, int64_t l0) const {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * Cfg::kThreads;
      if (c >= TOTAL) break;
      const int row = c / CPR, col = (c % CPR) * KC;
      const int64_t n = p0 + row;
      float w[KC];
      if (n < N && l0 + col < K) {
        const typename Dec::Params prm = dec.params(n, l0 + col);
#pragma unroll
        for (int j = 0; j < KC / 8; ++j) dec.decode8(raw[i], prm, j, w + 8 * j);
      } else {
#pragma unroll
        for (int e = 0; e < KC; ++e) w[e] = 0.f;
      }
      T* d = As + row * Cfg::LDS + col;
#pragma unroll
      for (int e = 0; e < KC; e += 8) {  // 16-byte shared stores
        Vec8<T> v;
        T* pv = reinterpret_cast<T*>(&v.raw);
#pragma unroll
        for (int q = 0; q < 8; ++q) pv[q] = from_f32<T>(w[e + q]);
        *reinterpret_cast<uint4*>(d + e) = v.raw;
      }
    }
  }
};

template <class Cfg, class Dec, class T>
__global__ void __launch_bounds__(Cfg::kThreads)
    mma_kernel(Dec dec, Operand<T> xo, const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ part,
               int64_t M, int64_t N, int64_t K, int64_t kchunk) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* As[2] = {smem, smem + Cfg::BP * Cfg::LDS};
  T* Bs[2] = {smem + 2 * Cfg::BP * Cfg::LDS, smem + 2 * Cfg::BP * Cfg::LDS + Cfg::BQ * Cfg::LDS};
  const int64_t p0 = int64_t(blockIdx.x) * Cfg::BP, q0 = int64_t(blockIdx.y) * Cfg::BQ;
  const int64_t lb = int64_t(blockIdx.z) * kchunk, le = min(K, lb + kchunk);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::FP][Cfg::FQ];
#pragma unroll
  for (int i = 0; i < Cfg::FP; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::FQ; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nblk = lb < le ? (le - lb + Cfg::BL - 1) / Cfg::BL : 0;
  ALoader<Cfg, Dec> A;
  if (nblk > 0) {
    A.fetch(dec, N, K, p0, lb);
    A.store(dec, As[0], N, K, p0, lb);
    load_tile<Cfg, Cfg::BQ>(Bs[0], xo, q0, lb, le);
    cp_async_commit();
  }
  for (int64_t b = 0; b < nblk; ++b) {
    const int s = b & 1;
    const int64_t ln = lb + (b + 1) * Cfg::BL;
    if (b + 1 < nblk) {
      A.fetch(dec, N, K, p0, ln);  // global loads in flight while this stage computes
      load_tile<Cfg, Cfg::BQ>(Bs[s ^ 1], xo, q0, ln, le);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    mma_stage<Cfg>(acc, As[s], Bs[s]);
    if (b + 1 < nblk) A.store(dec, As[s ^ 1], N, K, p0, ln);  // the other stage: last read before the previous barrier
    __syncthreads();
  }

  if (gridDim.z == 1) {
    emit_unit<Cfg>(acc, smem, N, M, p0, q0, [=](int64_t q, int64_t p, float v) {
      y[q * N + p] = from_f32<T>(v + (bias ? to_f32<T>(bias[p]) : 0.f));
    });
  } else {
    float* pz = part + int64_t(blockIdx.z) * M * N;
    emit_unit<Cfg>(acc, smem, N, M, p0, q0, [=](int64_t q, int64_t p, float v) { pz[q * N + p] = v; });
  }
}

// ------------------------------------------------------------------ launch

template <class Dec, class T, int MM>
void launch_gemv(const Dec& dec, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                 const Tensor& like, cudaStream_t stream) {
  const int64_t rows_per_cta = GEMV_WARPS * GEMV_ROWS;
  const int64_t gx = (N + rows_per_cta - 1) / rows_per_cta;
  const int64_t splits = (K + KTILE - 1) / KTILE;
  STD_TORCH_CHECK(gx < (int64_t(1) << 31) && splits < 65536, "reparam: problem too large for the GEMV grid");
  Tensor part = torch::stable::new_empty(like, {splits > 1 ? splits * M * N : 1}, ScalarType::Float);
  float* pp = static_cast<float*>(part.data_ptr());
  const int smem = MM * KTILE * int(sizeof(T));
  gemv_kernel<Dec, T, MM><<<dim3(unsigned(gx), unsigned(splits)), GEMV_WARPS * 32, smem, stream>>>(
      dec, x, bias, y, pp, int(M), N, K);
  RK_CUDA_CHECK(cudaGetLastError());
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>((M * N + 255) / 256, 4096);
    reduce_splits_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(pp, bias, y, int(splits), M, N);
    RK_CUDA_CHECK(cudaGetLastError());
  }
}

template <class Cfg, class Dec, class T>
void launch_mma(const Dec& dec, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                const Tensor& like, cudaStream_t stream) {
  constexpr int smem = Cfg::template smem_bytes<T>();
  static_assert(smem <= 48 * 1024, "tile config needs more than the default 48 KB of shared memory");
  const int64_t tp = (N + Cfg::BP - 1) / Cfg::BP, tq = (M + Cfg::BQ - 1) / Cfg::BQ;
  const int64_t kblocks = (K + Cfg::BL - 1) / Cfg::BL;
  const int64_t target = 2 * int64_t(sm_count(like.get_device_index()));
  int64_t splits = 1;
  if (tp * tq < target) splits = std::max<int64_t>(1, std::min((target + tp * tq - 1) / (tp * tq), kblocks / 4));
  const int64_t kchunk = ((kblocks + splits - 1) / splits) * Cfg::BL;
  splits = (K + kchunk - 1) / kchunk;
  STD_TORCH_CHECK(tp < (int64_t(1) << 31) && tq < 65536, "reparam: problem too large for the GEMM grid");
  Tensor part = torch::stable::new_empty(like, {splits > 1 ? splits * M * N : 1}, ScalarType::Float);
  float* pp = static_cast<float*>(part.data_ptr());
  const Operand<T> xo{x, M, K, K % 8 == 0 && aligned16(x)};
  mma_kernel<Cfg, Dec, T><<<dim3(unsigned(tp), unsigned(tq), unsigned(splits)), Cfg::kThreads, smem, stream>>>(
      dec, xo, bias, y, pp, M, N, K, kchunk);
  RK_CUDA_CHECK(cudaGetLastError());
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>((M * N + 255) / 256, 4096);
    reduce_splits_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(pp, bias, y, int(splits), M, N);
    RK_CUDA_CHECK(cudaGetLastError());
  }
}

using MmaSmall = TileCfg<64, 16, 64, 4, 1>;     // 8 < M <= 16: weights dominate, thin Q tile
using MmaMid = TileCfg<64, 64, 64, 2, 2>;       // M <= 64
using MmaLarge = TileCfg<128, 128, 32, 4, 2>;   // prefill: dequantize a tile, tensor-core GEMM

// y = x @ W^T + bias for x [M, K] (contiguous), W given by `dec`.
template <class Dec, class T>
void quant_linear(const Dec& dec, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                  const Tensor& like, cudaStream_t stream) {
  if (M <= 1) launch_gemv<Dec, T, 1>(dec, x, bias, y, M, N, K, like, stream);
  else if (M <= 2) launch_gemv<Dec, T, 2>(dec, x, bias, y, M, N, K, like, stream);
  else if (M <= 4) launch_gemv<Dec, T, 4>(dec, x, bias, y, M, N, K, like, stream);
  else if (M <= 8) launch_gemv<Dec, T, 8>(dec, x, bias, y, M, N, K, like, stream);
  else if (M <= 16) launch_mma<MmaSmall, Dec, T>(dec, x, bias, y, M, N, K, like, stream);
  else if (M <= 64) launch_mma<MmaMid, Dec, T>(dec, x, bias, y, M, N, K, like, stream);
  else launch_mma<MmaLarge, Dec, T>(dec, x, bias, y, M, N, K, like, stream);
}

}  // namespace quant
}  // namespace reparam
