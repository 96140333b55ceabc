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
// H twiddles + 1 KB: one CTA per SM.
//
// Prediction (4096², b = 256, M = 2048, counted shared-memory traffic, 128 B/clock/SM): ≈ 1.4 MB per
// CTA of 4 rows with the radix-16 FFT (FFTs ≈ 0.5, sums ≈ 0.5, the rest ≈ 0.4), 512 CTAs on 132 SMs
// ≈ 22 µs, against ≈ 100 µs for the dense cuBLAS GEMM (docs/structured.md).
//
// Taken for M >= REPARAM_BC_LARGE_M_MIN_M (default 256; 0 = never) when the shared memory fits. By the
// same count, at M = 256 (64 CTAs, half the SMs idle) ≈ 7.5 µs against ≈ 18 µs for the general kernel,
// which recomputes every forward FFT once per output block there; about equal at M = 128; the
// general kernel ahead at 64.
#pragma once

#include "common.cuh"
#include "cublas_mm.cuh"
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

// s[ii] = S_{i0 + ii, j}[k] (re, im) for the IG output blocks from i0; zero past p
template <int IG, class T>
__device__ __forceinline__ void load_spectrum(float2 (&s)[IG], const Problem<T>& a, int i0, int j, int k) {
  const int hb = (a.b >> 1) + 1;
#pragma unroll
  for (int ii = 0; ii < IG; ++ii) {
    const int i = i0 + ii;
    const float* wij = a.w + (int64_t(i < a.p ? i : 0) * a.q + j) * 2 * hb;
    s[ii] = i < a.p ? make_float2(__ldg(wij + k), __ldg(wij + hb + k)) : make_float2(0.f, 0.f);
  }
}

template <class T, int TM, int IG, int NB>
__global__ void __launch_bounds__(kThreads, 1) kernel(Problem<T> a) {
  extern __shared__ __align__(16) float2 smem[];
  float2* buf_a = smem;
  float2* buf_b = smem + kBuf;
  float2* tw = smem + 2 * kBuf;          // [H] FFT twiddles
  float* nyq_s = reinterpret_cast<float*>(tw + (a.b >> 1));  // [pi * TM] Nyquist sums
  const int H = a.b >> 1, hb = H + 1;
  const int pi = IG * (kThreads * NB / H);  // output blocks per CTA
  const int64_t m0 = int64_t(blockIdx.x) * TM;
  const int rows = (a.M - m0 < TM) ? int(a.M - m0) : TM;
  const int i0 = blockIdx.y * pi;
  const int np = min(pi, a.p - i0);
  const int t = threadIdx.x;

  float2 acc[NB][IG][TM];
#pragma unroll
  for (int r = 0; r < NB; ++r)
#pragma unroll
    for (int ii = 0; ii < IG; ++ii)
#pragma unroll
      for (int mm = 0; mm < TM; ++mm) acc[r][ii][mm] = make_float2(0.f, 0.f);
  // the Nyquist bin of output block i0 + t / rows, row t % rows (threads t < np * rows)
  float nyq = 0.f;
  const bool nyq_owner = t < np * rows;
  const int nyq_i = nyq_owner ? t / rows : 0, nyq_mm = nyq_owner ? t - nyq_i * rows : 0;

  const int nj_max = kBuf / (rows * H);
  for (int j0 = 0; j0 < a.q; j0 += nj_max) {
    const int nj = min(nj_max, a.q - j0);
    load_pairs(buf_a, buf_b, a.x, m0, rows, a.K, j0, nj, a.b, [&] {  // sequence s = jj * rows + mm
      if (j0 == 0)  // the twiddle table (read after the load's barrier), while the first chunk is in flight
        for (int j = t; j < H; j += kThreads) tw[j] = expipi(-2.f * float(j) / float(H));
    });
    __syncthreads();
    const float2* res = stockham_fft(buf_a, buf_b, tw, H, nj * rows, false);
#pragma unroll
    for (int r = 0; r < NB; ++r) {
      const int u = t + kThreads * r, k = u % H, g = u / H;
      if (g * IG >= np) continue;  // uniform per warp (H >= 32)
      const int kc = k == 0 ? 0 : H - k;
      const float2 wk = expipi(-float(k) / float(H));  // e^{-2 pi i k / b}
      // S_ij[k] of this group's blocks (DC: its imaginary part only reaches Y[0].y, which the inverse
      // transform ignores), loaded one input block ahead: the L2 latency overlaps the previous block's sums
      float2 s[IG], s_next[IG];
      load_spectrum<IG>(s_next, a, i0 + g * IG, j0, k);
      for (int jj = 0; jj < nj; ++jj) {
#pragma unroll
        for (int ii = 0; ii < IG; ++ii) s[ii] = s_next[ii];
        if (jj + 1 < nj) load_spectrum<IG>(s_next, a, i0 + g * IG, j0 + jj + 1, k);
        const float2* z = res + jj * rows * H;
#pragma unroll
        for (int mm = 0; mm < TM; ++mm) {
          if (mm < rows) {
            const float2 zk = z[mm * H + k], zc = z[mm * H + kc];
            const float2 c = make_float2(zc.x, -zc.y);                       // conj(Z[H - k])
            const float2 e = cscale(cadd(zk, c), 0.5f);                        // FFT of even samples
            const float2 o = times_minus_i(cscale(csub(zk, c), 0.5f));        // FFT of odd samples
            const float2 xk = cadd(e, cmul(wk, o));                            // k = 0: (DC, 0)
#pragma unroll
            for (int ii = 0; ii < IG; ++ii) acc[r][ii][mm] = cadd(acc[r][ii][mm], cmul(s[ii], xk));
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
            const float2 z0 = res[((jb + u) * rows + nyq_mm) * H];
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
        if (lb < np && mm < rows) buf_a[(lb * rows + mm) * H + k] = acc[r][ii][mm];
    }
  }
  if (nyq_owner) nyq_s[t] = nyq;
  __syncthreads();
  const int nseq = np * rows;  // sequence s = block * rows + row
  for (int e = t; e < nseq * H; e += kThreads) {
    const int s = e / H, k = e - s * H;
    const float2* am = buf_a + s * H;
    const float2 av = k == 0 ? make_float2(am[0].x, 0.f) : am[k];
    const float2 cv = k == 0 ? make_float2(nyq_s[s], 0.f) : make_float2(am[H - k].x, -am[H - k].y);
    buf_b[swizzled(e)] = pack_bin(av, cv, k, H);  // stockham_fft's input layout
  }
  __syncthreads();
  const float2* res = stockham_fft(buf_b, buf_a, tw, H, nseq, true);
  store_blocks(res, nseq, rows, i0, a.b, a.y, a.bias, 0, m0, a.N);
}

inline size_t smem_bytes(int b) { return (2 * size_t(kBuf) + size_t(b / 2) + 128) * sizeof(float2); }

template <class T, int TM, int IG, int NB>
void launch_cfg(const Problem<T>& a, int device, cudaStream_t stream) {
  auto large_m_kernel = kernel<T, TM, IG, NB>;
  allow_smem_optin<kernel<T, TM, IG, NB>>(device);  // the device maximum: one instance serves several block sizes
  const int H = a.b / 2, pi = IG * (kThreads * NB / H);
  const dim3 grid(unsigned((a.M + TM - 1) / TM), unsigned((a.p + pi - 1) / pi));
  large_m_kernel<<<grid, kThreads, smem_bytes(a.b), stream>>>(a);
  RK_CUDA_CHECK(cudaGetLastError());
}

// Runs the large-M kernel and returns true when it applies (M at or above the threshold, the
// shared memory fits this device); else returns false and the caller takes block_circulant_kernel.
template <class T>
bool try_launch(const Problem<T>& a, int device, cudaStream_t stream) {
  if (a.M < min_m_from_env("REPARAM_BC_LARGE_M_MIN_M", 256)) return false;
  if (smem_bytes(a.b) > size_t(max_smem_optin(device))) return false;
  switch (a.b) {
    case 64: case 128: case 256: case 512: launch_cfg<T, 4, 8, 1>(a, device, stream); return true;
    case 1024: launch_cfg<T, 4, 4, 2>(a, device, stream); return true;
    case 2048: launch_cfg<T, 4, 2, 4>(a, device, stream); return true;
    case 4096: launch_cfg<T, 4, 1, 8>(a, device, stream); return true;
    default: return false;
  }
}

}  // namespace bc_large_m
}  // namespace reparam
