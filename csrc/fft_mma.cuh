// A 128-point complex FFT on tensor cores (mma.sync m16n8k16, fp16 / bf16 operands, fp32 sums): the
// transforms of the block-circulant large-M kernel at b = 256 (block_circulant_large_m.cuh), where the
// shared-memory Stockham FFT (fft_smem.cuh) cost ~1360 instructions a thread each way — with x's
// conversion, the spectrum packing and y's stores, two thirds of the kernel once its index math was
// fixed. Its operands come from a load(s, n) callback and its results go to emit(s, k, ...), so the
// kernel reads x's raw rows straight into the first stage and stores y from the last one.
//
// 128 = 16 x 8, n = 8 n2 + n1, k = k2 + 16 k1:
//   Z^[k2 + 16 k1] = sum_n1 W8^(n1 k1) W128^(n1 k2) sum_n2 W16^(n2 k2) Z[8 n2 + n1]
// Per sequence (one warp):
//   stage A: the 16-point DFTs over n2 as one real product [Ar; Ai] = [[C, -S], [S, C]] [Zr; Zi], a
//     32 x 32 matrix (C + iS = W16^(n2 k2), scaled by 1/16: its outputs stay within sqrt(2) x the
//     input's largest part, so fp16 holds them for |x| < 46 000) times 32 x 8 (the columns are n1): 4 mma;
//   the twiddles W128^(n1 k2): four complex products a lane, in fp32;
//   stage B: the 8-point DFTs over n1, [[C, -S], [S, C]] (16 x 16, C + iS = W8^(n1 k1)) times 16 x 8
//     (columns k2 = 0..7, then 8..15): 2 mma.
// No shuffle between the stages: stage A's accumulator fragment (lane g, t: rows k2 = g, g + 8, columns
// n1 = 2t, 2t + 1) is, packed in pairs, exactly stage B's operand fragment (rows n1 = 2t, 2t + 1 of the
// real and the imaginary half, column k2 = g). Its output fragment holds Z^ at k = 2t + 8 nt + 16 g and
// k + 1 (one 16-byte store).
//
// Precision: the operands are rounded to T once per stage (relative 2^-11 in fp16, 2^-8 in bf16; the
// DFT matrices' entries likewise); sums in fp32. Checked against float64 through the whole op
// (python_tests/test_cuda_on_cpu_circulant.py; tolerances 5e-3 fp16, 2e-2 bf16).
#pragma once

#include "fft_smem.cuh"
#include "small_m_regs.cuh"

// mma.sync m16n8k16 with bf16 needs sm_80: below it (never launched there) the Stockham FFT is compiled
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define REPARAM_MMA_FFT 0
#else
#define REPARAM_MMA_FFT 1
#endif

namespace reparam {
namespace fft {

// (1/16) DFT(in_scale * Z) of each of the nseq sequences Z (forward: sign -1; inverse: +1,
// unnormalized): load(s, n) returns Z[n] of sequence s; emit(s, k, v) takes Z^[k] and Z^[k + 1] (k even)
// as v = (re k, im k, re k + 1, im k + 1), each (s, k) once, in no particular order. tw: e^{-2 pi i j / 128},
// j < 128. Every thread of the CTA calls it (after a barrier that made what load reads and tw visible);
// it ends with a barrier.
template <class T, class Load, class Emit>
__device__ __forceinline__ void mma_fft128(int nseq, const float2* tw, bool inverse, float in_scale, Load&& load,
                                           Emit&& emit) {
  using P = small_m::Pair<T>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  auto w = [&](int m) {  // W128^m, conjugated for the inverse
    const float2 v = tw[m & 127];
    return inverse ? make_float2(v.x, -v.y) : v;
  };
  // Fragment register q of a 16 x 16 operand holds rows g + 8 (q & 1), columns 2t + 8 (q >> 1) and + 1.
  uint32_t a_re[4], a_im[4], a_nim[4], b_op[4];  // stage A: C / 16, S / 16, -S / 16; stage B's matrix
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = g + 8 * (q & 1), c = 2 * t + 8 * (q >> 1);
    const float2 w0 = w(8 * r * c), w1 = w(8 * r * (c + 1));  // W16^(n2 k2): k2 = r, n2 = c, c + 1
    a_re[q] = P::pack2(w0.x / 16.f, w1.x / 16.f);
    a_im[q] = P::pack2(w0.y / 16.f, w1.y / 16.f);
    a_nim[q] = P::pack2(-w0.y / 16.f, -w1.y / 16.f);
    // stage B, rows (re / im out, k1), columns (re / im in, n1): [[C, -S], [S, C]]
    float v[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int k1 = r & 7, n1 = (c + e) & 7, ro = r >> 3, ri = (c + e) >> 3;
      const float2 u = w(16 * n1 * k1);
      v[e] = ro == ri ? u.x : ro == 0 ? -u.y : u.y;
    }
    b_op[q] = P::pack2(v[0], v[1]);
  }
  float2 tw_ab[4];  // W128^(n1 k2) at this lane's stage-A outputs (k2, n1) = (g + 8 (q >> 1), 2t + (q & 1))
#pragma unroll
  for (int q = 0; q < 4; ++q) tw_ab[q] = w((2 * t + (q & 1)) * (g + 8 * (q >> 1)));

  for (int s = threadIdx.x >> 5; s < nseq; s += blockDim.x >> 5) {
    // stage A operand: Z[8 n2 + g] at n2 = 2t, 2t + 1 (first register) and 2t + 8, 2t + 9 (second)
    float2 z[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) z[e] = load(s, 16 * t + 8 * (e & 1) + 64 * (e >> 1) + g);
    const uint32_t re0 = P::pack2(z[0].x * in_scale, z[1].x * in_scale);
    const uint32_t re1 = P::pack2(z[2].x * in_scale, z[3].x * in_scale);
    const uint32_t im0 = P::pack2(z[0].y * in_scale, z[1].y * in_scale);
    const uint32_t im1 = P::pack2(z[2].y * in_scale, z[3].y * in_scale);
    float ar[4] = {0.f, 0.f, 0.f, 0.f}, ai[4] = {0.f, 0.f, 0.f, 0.f};
    P::mma(ar, a_re, re0, re1);  // Ar = C Zr - S Zi
    P::mma(ar, a_nim, im0, im1);
    P::mma(ai, a_im, re0, re1);  // Ai = S Zr + C Zi
    P::mma(ai, a_re, im0, im1);
    // accumulator q: k2 = g + 8 (q >> 1), n1 = 2t + (q & 1); times W128^(n1 k2)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 v = cmul(make_float2(ar[q], ai[q]), tw_ab[q]);
      ar[q] = v.x;
      ai[q] = v.y;
    }
    // stage B, column tile nt (k2 = g + 8 nt): operand rows n1 = 2t, 2t + 1 of the real, then imaginary half
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      P::mma(d, b_op, P::pack2(ar[2 * nt], ar[2 * nt + 1]), P::pack2(ai[2 * nt], ai[2 * nt + 1]));
      // rows k1 = g (real), g + 8 (imaginary); columns k2 = 2t + 8 nt, + 1: k = k2 + 16 g
      emit(s, 16 * g + 8 * nt + 2 * t, make_float4(d[0], d[2], d[1], d[3]));
    }
  }
  __syncthreads();
}

}  // namespace fft
}  // namespace reparam
