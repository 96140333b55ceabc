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
// two twiddle tables (b float2) + 1 KB (+ on tensor cores the CTA's bias, pi b floats: 16 KB at
// b = 256): one CTA per SM. One instance per block size b: H and TM are
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
// At b = 256 and 512 in fp16 / bf16 the transforms then run on tensor cores (fft_mma.cuh), x's raw rows
// feeding the first stage and y stored from the last (no conversion, packing or store loops); at
// b = 256 ~6.8 K — forward 8 sequences x 68, inverse 8 x ~200 (packing and stores inside), the sums
// 16 x 220 now half.
// Prediction: 3.6x fewer instructions than session 11's kernel, a CTA ≈ 13 µs at its issue rate (less
// of the issue slots used once latency weighs more): M = 2048 ≈ 45–70 µs (≈ 1.5–2.3x cuBLAS, target
// ≥ 2x); M = 64..256 ≈ 13–20 µs against the general kernel's 36.5 µs at M = 64. Every CTA re-reads the
// spectrum from L2 (264 KB at 4096², b = 256; 135 MB over M = 2048): ~20–25 µs of L2 bandwidth, under
// the prediction but not by much. fp32 (and the other block sizes) keep the Stockham FFT: ~10.3 K a
// thread in fp32 at b = 256, predicted ≈ 65–90 µs at M = 2048.
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

// Output blocks per CTA: IG a group, kThreads NB / H groups (thread t's bins t + kThreads r, r < NB).
template <int B, int IG, int NB>
constexpr int cta_blocks() {
  return IG * (kThreads * NB / (B / 2));
}

// The spectrum of bin k of one (block, row) packed as the inverse real FFT wants it (pack_bin): from its
// Y ([H], bin 0: DC in .x) and Nyquist sum; tw_b[k] = e^{-2 pi i k / b}.
template <int H>
__device__ __forceinline__ float2 packed_bin(const float2* y, float nyq, const float2* tw_b, int k) {
  const float2 av = k == 0 ? make_float2(y[0].x, 0.f) : y[k];
  const float2 cv = k == 0 ? make_float2(nyq, 0.f) : make_float2(y[H - k].x, -y[H - k].y);
  const float2 wb = tw_b[k];
  return pack_bin(av, cv, make_float2(wb.x, -wb.y));
}

// The transforms: on tensor cores at b = 256 and 512 for fp16 / bf16 (fft_mma.cuh: x's raw rows in, the
// spectrum packing and y's stores fused into the inverse), else the shared-memory Stockham FFT. The
// tensor-core FFT returns (1/16) DFT(in_scale Z): kZ undoes that for the forward transform; the
// inverse's input is scaled by 1/H (its fp16 operands stay in range) and its output by 16.
template <class T, int H>
constexpr bool kMmaFft = (H == 128 || H == 256) && sizeof(T) == 2 && REPARAM_MMA_FFT;

// Forward, tensor cores: Z[n] = raw x pair n of sequence s (raw: [s][B] elements, zero-padded), the
// transforms to out[s * H + k] in natural order.
template <class T, int B>
__device__ __forceinline__ void forward_mma(const T* raw, float2* out, const float2* tw, int nseq) {
  constexpr int H = B / 2;
  mma_fft<T, H>(nseq, tw, false, 1.f, [&](int s, int n) { return load_pair(raw + s * B + 2 * n); },
                [&](int s, int k, float4 v) { *reinterpret_cast<float4*>(out + s * H + k) = v; });
}

// Inverse, tensor cores, for the nseq = np * TM sequences s = block * TM + row of Y in ys ([s][H],
// bin 0: DC in .x; Nyquist sums in nyq_s[s]): each bin packed as the inverse real FFT wants it
// (pack_bin) as it is loaded, and y = 16 z + bias stored from the result fragments, four columns a
// store (bias_s: the CTA's pi * B columns' bias in fp32, 0 past N).
template <class T, int B, int TM>
__device__ __forceinline__ void inverse_mma(const Problem<T>& a, const float2* ys, const float* nyq_s,
                                            const float* bias_s, const float2* tw, const float2* tw_b, int nseq,
                                            int64_t m0, int live, int i0) {
  constexpr int H = B / 2;
  const bool pairs = a.N % 2 == 0 && reinterpret_cast<uintptr_t>(a.y) % (2 * sizeof(T)) == 0;
  mma_fft<T, H>(
      nseq, tw, true, 1.f / H,
      [&](int s, int n) { return packed_bin<H>(ys + s * H, nyq_s[s], tw_b, n); },
      [&](int s, int k, float4 v) {  // z[k], z[k + 1] = y columns 2k .. 2k + 3 of block s / TM, row s % TM
        const int lb = s / TM, mm = s % TM;
        if (mm >= live) return;
        const int64_t col = int64_t(i0 + lb) * B + 2 * k;
        const float4 bv = *reinterpret_cast<const float4*>(bias_s + lb * B + 2 * k);
        const float o[4] = {fmaf(v.x, 16.f, bv.x), fmaf(v.y, 16.f, bv.y), fmaf(v.z, 16.f, bv.z), fmaf(v.w, 16.f, bv.w)};
        T* yr = a.y + (m0 + mm) * a.N + col;
        if (pairs && col + 3 < a.N) {
          store_pair(yr, o[0], o[1]);
          store_pair(yr + 2, o[2], o[3]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (col + e < a.N) yr[e] = from_f32<T>(o[e]);
        }
      });
}

template <class T, int B, int TM, int IG, int NB>
__global__ void __launch_bounds__(kThreads, 1) kernel(Problem<T> a) {
  constexpr int H = B / 2, hb = H + 1;
  constexpr int pi = cta_blocks<B, IG, NB>();
  constexpr int nj_max = kBuf / (TM * H);       // input blocks per pass
  constexpr bool kMma = kMmaFft<T, H>;
  constexpr float kZ = kMma ? 16.f : 1.f;
  extern __shared__ __align__(16) float2 smem[];
  float2* buf_a = smem;
  float2* buf_b = smem + kBuf;
  float2* tw = smem + 2 * kBuf;                             // [H] e^{-2 pi i j / H}: the FFTs' twiddles
  float2* tw_b = tw + H;                                    // [H] e^{-2 pi i k / b}: the real-FFT split
  float* nyq_s = reinterpret_cast<float*>(tw_b + H);        // [pi * TM <= 256] Nyquist sums
  float* bias_s = nyq_s + 256;                              // tensor cores: [pi * B] the CTA's bias
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
    // setup while the first chunk is in flight (read after the load's barrier): the twiddle tables and,
    // for the tensor-core inverse's stores, the CTA's bias columns (loads in batches)
    auto setup = [&] {
      if (j0 != 0) return;
      for (int j = t; j < H; j += kThreads) {
        tw[j] = expipi(-2.f * float(j) / float(H));
        tw_b[j] = expipi(-float(j) / float(H));
      }
      if constexpr (kMma) {
        const int64_t c0 = int64_t(i0) * B;
        batched<float>(
            pi * B, [&](int e) { return a.bias != nullptr && c0 + e < a.N ? to_f32<T>(a.bias[c0 + e]) : 0.f; },
            [&](int e, float v) { bias_s[e] = v; });
      }
    };
    const float2* res = buf_a;  // sequence s = jj * TM + mm, natural order
    if constexpr (kMma) {
      load_pairs<B, TM, true>(buf_a, buf_b, a.x, m0, TM, live, a.K, j0, nj, B, setup);
      __syncthreads();
      forward_mma<T, B>(reinterpret_cast<const T*>(buf_b), buf_a, tw, nj * TM);
    } else {
      load_pairs<B, TM>(buf_a, buf_b, a.x, m0, TM, live, a.K, j0, nj, B, setup);
      __syncthreads();
      res = stockham_fft_fixed<H>(buf_a, buf_b, tw, nj * TM, false);
    }
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
  if constexpr (kMma) {
    inverse_mma<T, B, TM>(a, buf_a, nyq_s, bias_s, tw, tw_b, nseq, m0, live, i0);
  } else {
    for (int e = t; e < nseq * H; e += kThreads) {
      const int s = int(unsigned(e) / H), k = e - s * H;
      buf_b[swizzled(e)] = packed_bin<H>(buf_a + s * H, nyq_s[s], tw_b, k);  // stockham_fft's input layout
    }
    __syncthreads();
    const float2* res = stockham_fft_fixed<H>(buf_b, buf_a, tw, nseq, true);
    store_blocks<B, TM>(res, nseq, TM, live, i0, B, a.y, a.bias, 0, m0, a.N, 1.f / H);
  }
}

// the two buffers, both twiddle tables, the Nyquist sums (pi * TM <= 256 floats); tensor cores: the bias
template <class T, int B, int IG, int NB>
constexpr size_t smem_bytes() {
  constexpr int pi = cta_blocks<B, IG, NB>();
  return (2 * size_t(kBuf) + size_t(B) + 128) * sizeof(float2) + (kMmaFft<T, B / 2> ? size_t(pi) * B * 4 : 0);
}

// Launches the kernel and returns true when its shared memory fits this device.
template <class T, int B, int TM, int IG, int NB>
bool launch_cfg(const Problem<T>& a, int device, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<T, B, IG, NB>();
  if (smem > size_t(max_smem_optin(device))) return false;
  auto large_m_kernel = kernel<T, B, TM, IG, NB>;
  allow_smem_optin<kernel<T, B, TM, IG, NB>>(device);
  constexpr int pi = cta_blocks<B, IG, NB>();
  const dim3 grid(unsigned((a.M + TM - 1) / TM), unsigned((a.p + pi - 1) / pi));
  large_m_kernel<<<grid, kThreads, smem, stream>>>(a);
  RK_CUDA_CHECK(cudaGetLastError());
  return true;
}

// Runs the large-M kernel and returns true when it applies (M at or above the threshold, the
// shared memory fits this device); else returns false and the caller takes block_circulant_kernel.
// One instance per block size: H and the rows per CTA are compile-time constants.
template <class T>
bool try_launch(const Problem<T>& a, int device, cudaStream_t stream) {
  if (a.M < min_m_from_env("REPARAM_BC_LARGE_M_MIN_M", 64)) return false;
  switch (a.b) {
    case 64: return launch_cfg<T, 64, 4, 8, 1>(a, device, stream);
    case 128: return launch_cfg<T, 128, 4, 8, 1>(a, device, stream);
    case 256: return launch_cfg<T, 256, 4, 8, 1>(a, device, stream);
    case 512: return launch_cfg<T, 512, 4, 8, 1>(a, device, stream);
    case 1024: return launch_cfg<T, 1024, 4, 4, 2>(a, device, stream);
    case 2048: return launch_cfg<T, 2048, 4, 2, 4>(a, device, stream);
    case 4096: return launch_cfg<T, 4096, 4, 1, 8>(a, device, stream);
    default: return false;
  }
}

}  // namespace bc_large_m
}  // namespace reparam
