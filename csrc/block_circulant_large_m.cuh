// Block-circulant linear for large M: the frequency-domain block sum accumulated in registers.
//
// y_i = irfft(sum_j S_ij * X_j), X_j = rfft(x_j), for a tile of TM rows and a group of pi output
// blocks per CTA, ONE launch, no complex data in global memory (as block_circulant_linear.cu).
// That kernel keeps its spectrum sums in shared memory and re-reads the spectrum S from L1 for
// every row; at large M those two streams are most of its shared-memory traffic (by count, 4096²
// b = 256 M = 2048: ~4.5 of the ~7.6 MB a CTA moved with the radix-4 FFT, bank conflicts aside). Here,
// per frequency bin k, the sum over j is a small complex GEMM Y[mm, i] += X_j[mm] * S_ij[k], and each
// thread owns NB bins x IG output blocks x TM rows of Y in registers for the whole pass over j: S_ij[k]
// is loaded once per thread and used TM times, X_j[mm][k] once and used IG times, and nothing is
// written back until the end.
//
//   1. per chunk of nj input blocks: load x as complex pairs, forward Stockham FFTs (fft_smem.cuh);
//      each thread splits its bins out of the packed transforms (X[k] from Z[k], conj Z[H - k]) and
//      accumulates. Bin 0 carries DC in the registers; the Nyquist bin (real) is summed on the side
//      by one thread per (output block, row).
//   2. once: the register sums go to shared memory, are packed two bins at a time into H complex
//      values per (block, row), inverse FFT, y (+ bias) written for columns < N.
//
// Thread t owns bins u = t + 256 r (r < NB): k = u % H, group g = u / H covers output blocks
// i0 + g IG .. + IG - 1. Per H: H <= 256: TM 4, IG 8, NB 1 (pi = 2048 / H output blocks: all 16 of
// 4096² at b = 256, so each forward FFT is computed once); H = 512: TM 4, IG 4, NB 2; 1024: TM 4,
// IG 2, NB 4; 2048: TM 4, IG 1, NB 8 — always 64 fp32 accumulators a thread and pi * TM * H = 8192
// complex values of Y per CTA (64 KB, one of the two ping-pong buffers). Shared memory: 2 x 64 KB +
// two twiddle tables (b float2) + 1 KB: one CTA per SM. One instance per block size b: H and TM are
// compile-time constants, so the index math is shifts and masks and the FFT passes are unrolled.
//
// Time (session 16, from the H200 run of session 11): a CTA took ~46 µs whatever the grid (16, 64 and
// 512 CTAs at M = 64, 256, 2048: 46.7, 47.0 and 183.5 µs = 3.9 waves x 47), where a count of
// shared-memory traffic had predicted ~5.5 µs (M = 2048: 22 µs, measured 183.5). The SASS says why: the
// kernel was issue-bound. Per thread (b = 256, 4 rows, 16 input blocks) ~24.6 K instructions: the
// spectrum sums 16 x 493 (each spectrum load ~20 instructions of 64-bit address math), runtime-H
// 32-bit divisions in every load, packing and store loop (the store ~174 instructions per column
// pair), the packing's sincospif per element, FFT passes of 660 / 333 instructions; 8 warps x 24.6 K
// on 4 schedulers is ~49 K cycles = 25 µs of pure issue, ~54 % of the slots used. Now ~10.3 K
// (`tools/sass_budget.py --loops --filter bc_large_m`): sums 16 x 220 (pointer increments, four FMAs
// a complex multiply-add), FFT passes 329 / 175, x conversion ~30 and packing ~35 a value (the
// split's twiddle from a table), ~38 a stored pair, no integer division left in the kernel.
// Prediction: 2.4x fewer instructions, a CTA ~19 µs at the same issue rate: M = 2048 ≈ 65–90 µs
// (≈ 1.2–1.6x cuBLAS; target ≥ 2x, which needs the transforms themselves on tensor cores:
// docs/structured.md), M = 256 ≈ 19 µs, M = 64 ≈ 19 µs against the general kernel's 36.5 µs.
//
// Taken for M >= REPARAM_BC_LARGE_M_MIN_M (default 64, from that prediction: the general kernel
// measured 36.5 µs at M = 64 for 4096² b = 256, 18 µs for b = 4096; 0 = never) when the shared memory
// fits; bench_structured times the kernel not taken (cuda_large_m / cuda_fft_per_block) from M = 16.
#pragma once

#include "common.cuh"
#include "cublas_mm.cuh"
#include "fft_mma.cuh"
#include "fft_smem.cuh"

namespace reparam {
namespace bc_large_m {

using namespace fft;

constexpr int kThreads = 256;
constexpr int kBuf = 8192;  // complex values per ping-pong buffer

template <class T>
struct Problem {
  const T* x;      // [M, K]
  const float* w;  // [p, q, 2, H + 1]
  const T* bias;   // [N] or nullptr
  T* y;            // [M, N]
  int64_t M, K, N;
  int p, q, b;
};

// The transforms: on tensor cores at b = 256 for fp16 / bf16 (fft_mma.cuh), else the shared-memory
// Stockham FFT. The tensor-core one returns (1/16) DFT(in_scale Z): kZ undoes that for the forward
// transform; the inverse's input is scaled by 1/H (its fp16 operands stay in range) and its output
// by 16 (kOutScale) instead of 1/H.
template <class T, int H>
constexpr bool kMmaFft = H == 128 && sizeof(T) == 2 && REPARAM_MMA_FFT;

template <class T, int H>
__device__ __forceinline__ const float2* transform(float2* in, float2* out, const float2* tw, int nseq, bool inverse) {
  if constexpr (kMmaFft<T, H>) {
    return mma_fft128<T>(in, out, tw, nseq, inverse, inverse ? 1.f / H : 1.f);
  } else {
    return stockham_fft_fixed<H>(in, out, tw, nseq, inverse);
  }
}

template <class T, int B, int TM, int IG, int NB>
__global__ void __launch_bounds__(kThreads, 1) kernel(Problem<T> a) {
  constexpr int H = B / 2, hb = H + 1;
  constexpr int pi = IG * (kThreads * NB / H);  // output blocks per CTA
  constexpr int nj_max = kBuf / (TM * H);       // input blocks per pass
  constexpr float kZ = kMmaFft<T, H> ? 16.f : 1.f, kOutScale = kMmaFft<T, H> ? 16.f : 1.f / H;
  extern __shared__ __align__(16) float2 smem[];
  float2* buf_a = smem;
  float2* buf_b = smem + kBuf;
  float2* tw = smem + 2 * kBuf;                             // [H] e^{-2 pi i j / H}: the FFTs' twiddles
  float2* tw_b = tw + H;                                    // [H] e^{-2 pi i k / b}: the real-FFT split
  float* nyq_s = reinterpret_cast<float*>(tw_b + H);        // [pi * TM] Nyquist sums
  const int64_t m0 = int64_t(blockIdx.x) * TM;
  const int live = (a.M - m0 < TM) ? int(a.M - m0) : TM;  // rows past M: zeros in, nothing out (the
  const int i0 = blockIdx.y * pi;                          // layout keeps TM rows: index math by shifts)
  const int np = min(pi, a.p - i0);
  const int t = threadIdx.x;

  float2 acc[NB][IG][TM];
#pragma unroll
  for (int r = 0; r < NB; ++r)
#pragma unroll
    for (int ii = 0; ii < IG; ++ii)
#pragma unroll
      for (int mm = 0; mm < TM; ++mm) acc[r][ii][mm] = make_float2(0.f, 0.f);
  // the Nyquist bin of output block i0 + t / TM, row t % TM (threads t < np * TM)
  float nyq = 0.f;
  const bool nyq_owner = t < np * TM;
  const int nyq_i = nyq_owner ? t / TM : 0, nyq_mm = t % TM;

  for (int j0 = 0; j0 < a.q; j0 += nj_max) {
    const int nj = min(nj_max, a.q - j0);
    load_pairs<B, TM>(buf_a, buf_b, a.x, m0, TM, live, a.K, j0, nj, B, [&] {  // sequence s = jj * TM + mm
      if (j0 == 0)  // the twiddle tables (read after the load's barrier), while the first chunk is in flight
        for (int j = t; j < H; j += kThreads) {
          tw[j] = expipi(-2.f * float(j) / float(H));
          tw_b[j] = expipi(-float(j) / float(H));
        }
    });
    __syncthreads();
    const float2* res = transform<T, H>(buf_a, buf_b, tw, nj * TM, false);
#pragma unroll
    for (int r = 0; r < NB; ++r) {
      const int u = t + kThreads * r, k = u % H, g = u / H;
      if (g * IG >= np) continue;  // uniform per warp (H >= 32)
      const int kc = k == 0 ? 0 : H - k;
      const float2 wh = cscale(tw_b[k], 0.5f * kZ);  // e^{-2 pi i k / b} / 2 (x kZ)
      // S_ij[k] (re at +0, im at +hb) of this group's IG blocks, block (i, j) at w + (i q + j) 2 hb; blocks
      // past p (a group cut short) read the last block's: their sums are never stored. Loaded one input
      // block ahead: the L2 latency overlaps the previous block's sums. (DC: S's imaginary part only
      // reaches Y[0].y, which the inverse transform ignores.)
      const float* wr[IG];
#pragma unroll
      for (int ii = 0; ii < IG; ++ii)
        wr[ii] = a.w + (int64_t(min(i0 + g * IG + ii, a.p - 1)) * a.q + j0) * 2 * hb + k;
      float2 s[IG], s_next[IG];
#pragma unroll
      for (int ii = 0; ii < IG; ++ii) s_next[ii] = make_float2(__ldg(wr[ii]), __ldg(wr[ii] + hb));
      for (int jj = 0; jj < nj; ++jj) {
#pragma unroll
        for (int ii = 0; ii < IG; ++ii) s[ii] = s_next[ii];
        if (jj + 1 < nj) {
#pragma unroll
          for (int ii = 0; ii < IG; ++ii) {
            wr[ii] += 2 * hb;
            s_next[ii] = make_float2(__ldg(wr[ii]), __ldg(wr[ii] + hb));
          }
        }
        const float2* z = res + jj * TM * H;
#pragma unroll
        for (int mm = 0; mm < TM; ++mm) {
          // X[k] = (Z[k] + conj Z[H-k]) / 2 + e^{-2 pi i k / b} (Z[k] - conj Z[H-k]) / (2i) (k = 0: (DC, 0))
          const float2 zk = z[mm * H + k], zc = z[mm * H + kc];
          const float ex = zk.x + zc.x, ey = zk.y - zc.y, dx = zk.x - zc.x, dy = zk.y + zc.y;
          const float2 xk = make_float2(fmaf(wh.x, dy, fmaf(wh.y, dx, 0.5f * kZ * ex)),
                                        fmaf(wh.y, dy, fmaf(-wh.x, dx, 0.5f * kZ * ey)));
#pragma unroll
          for (int ii = 0; ii < IG; ++ii) {  // acc += S X, four FMAs
            float2& c = acc[r][ii][mm];
            c.x = fmaf(s[ii].x, xk.x, fmaf(-s[ii].y, xk.y, c.x));
            c.y = fmaf(s[ii].x, xk.y, fmaf(s[ii].y, xk.x, c.y));
          }
        }
      }
    }
    if (nyq_owner) {  // X_j[H] = Z_j[0].re - Z_j[0].im, real; S_ij[H] real; kBatch loads in flight at once
      const float* wi = a.w + (int64_t(i0 + nyq_i) * a.q + j0) * 2 * hb + H;
      for (int jb = 0; jb < nj; jb += kBatch) {
        float sv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) sv[u] = jb + u < nj ? __ldg(wi + int64_t(jb + u) * 2 * hb) : 0.f;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (jb + u < nj) {
            const float2 z0 = res[((jb + u) * TM + nyq_mm) * H];
            nyq += sv[u] * (z0.x - z0.y);
          }
        }
      }
    }
    __syncthreads();  // res is overwritten by the next load (or by the sums below)
  }

  // 2. Y to shared memory as [block][row][H] (bin 0: DC in .x), the Nyquist sums beside it
#pragma unroll
  for (int r = 0; r < NB; ++r) {
    const int u = t + kThreads * r, k = u % H, g = u / H;
#pragma unroll
    for (int ii = 0; ii < IG; ++ii) {
      const int lb = g * IG + ii;
#pragma unroll
      for (int mm = 0; mm < TM; ++mm)
        if (lb < np) buf_a[(lb * TM + mm) * H + k] = acc[r][ii][mm];
    }
  }
  if (nyq_owner) nyq_s[t] = nyq * kZ;
  __syncthreads();
  const int nseq = np * TM;  // sequence s = block * TM + row
  for (int e = t; e < nseq * H; e += kThreads) {
    const int s = int(unsigned(e) / H), k = e - s * H;
    const float2* am = buf_a + s * H;
    const float2 av = k == 0 ? make_float2(am[0].x, 0.f) : am[k];
    const float2 cv = k == 0 ? make_float2(nyq_s[s], 0.f) : make_float2(am[H - k].x, -am[H - k].y);
    const float2 wb = tw_b[k];
    buf_b[swizzled(e)] = pack_bin(av, cv, make_float2(wb.x, -wb.y));  // stockham_fft's input layout
  }
  __syncthreads();
  const float2* res = transform<T, H>(buf_b, buf_a, tw, nseq, true);
  store_blocks<B, TM>(res, nseq, TM, live, i0, B, a.y, a.bias, 0, m0, a.N, kOutScale);
}

// the two buffers, both twiddle tables, the Nyquist sums (pi * TM <= 256 floats)
inline size_t smem_bytes(int b) { return (2 * size_t(kBuf) + size_t(b) + 128) * sizeof(float2); }

template <class T, int B, int TM, int IG, int NB>
void launch_cfg(const Problem<T>& a, int device, cudaStream_t stream) {
  auto large_m_kernel = kernel<T, B, TM, IG, NB>;
  allow_smem_optin<kernel<T, B, TM, IG, NB>>(device);
  constexpr int pi = IG * (kThreads * NB / (B / 2));
  const dim3 grid(unsigned((a.M + TM - 1) / TM), unsigned((a.p + pi - 1) / pi));
  large_m_kernel<<<grid, kThreads, smem_bytes(B), stream>>>(a);
  RK_CUDA_CHECK(cudaGetLastError());
}

// Runs the large-M kernel and returns true when it applies (M at or above the threshold, the
// shared memory fits this device); else returns false and the caller takes block_circulant_kernel.
// One instance per block size: H and the rows per CTA are compile-time constants.
template <class T>
bool try_launch(const Problem<T>& a, int device, cudaStream_t stream) {
  if (a.M < min_m_from_env("REPARAM_BC_LARGE_M_MIN_M", 64)) return false;
  if (smem_bytes(a.b) > size_t(max_smem_optin(device))) return false;
  switch (a.b) {
    case 64: launch_cfg<T, 64, 4, 8, 1>(a, device, stream); return true;
    case 128: launch_cfg<T, 128, 4, 8, 1>(a, device, stream); return true;
    case 256: launch_cfg<T, 256, 4, 8, 1>(a, device, stream); return true;
    case 512: launch_cfg<T, 512, 4, 8, 1>(a, device, stream); return true;
    case 1024: launch_cfg<T, 1024, 4, 4, 2>(a, device, stream); return true;
    case 2048: launch_cfg<T, 2048, 4, 2, 4>(a, device, stream); return true;
    case 4096: launch_cfg<T, 4096, 4, 1, 8>(a, device, stream); return true;
    default: return false;
  }
}

}  // namespace bc_large_m
}  // namespace reparam
