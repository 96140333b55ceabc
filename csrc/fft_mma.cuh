// 128- and 256-point complex FFTs on tensor cores (mma.sync m16n8k16, fp16 / bf16 operands, fp32
// sums): the transforms of the block-circulant large-M kernel at b = 256 and 512
// (block_circulant_large_m.cuh), where the shared-memory Stockham FFT (fft_smem.cuh) cost ~1360
// instructions a thread each way at b = 256 — with x's conversion, the spectrum packing and y's
// stores, two thirds of the kernel once its index math was fixed. Its operands come from a load(s, n)
// callback and its results go to emit(s, k, ...), so the kernel reads x's raw rows straight into the
// first stage and stores y from the last one.
//
// H = 16 x R (R = 8 or 16), n = R n2 + n1, k = k2 + 16 k1:
//   Z^[k2 + 16 k1] = sum_n1 WR^(n1 k1) WH^(n1 k2) sum_n2 W16^(n2 k2) Z[R n2 + n1]
// Per sequence (one warp):
//   stage A: the 16-point DFTs over n2 as one real product [Ar; Ai] = [[C, -S], [S, C]] [Zr; Zi], a
//     32 x 32 matrix (C + iS = W16^(n2 k2), scaled by 1/16: its outputs stay within sqrt(2) x the
//     input's largest part, so fp16 holds them for |x| < 46 000) times 32 x R (the columns are n1):
//     4 mma per 8 columns;
//   the twiddles WH^(n1 k2): 4 R / 8 complex products a lane, in fp32;
//   stage B: the R-point DFTs over n1, the real form of WR^(n1 k1) (16 x 16 for R = 8: 2 mma; 32 x 32
//     for R = 16: 8 mma) times the columns k2 = 0..7, then 8..15.
// No shuffle between the stages: stage A's accumulator fragment (lane g, t: rows k2 = g, g + 8, columns
// n1 = 2t, 2t + 1 of each 8-column tile) is, packed in pairs, exactly stage B's operand fragment (rows
// n1 = 2t, 2t + 1 (+ 8) of the real and the imaginary half, column k2 = g). Its output fragment holds Z^
// at k = 2t + 8 mt + 16 k1 and k + 1 (one 16-byte value each).
//
// Precision: the operands are rounded to T once per stage (relative 2^-11 in fp16, 2^-8 in bf16; the
// DFT matrices' entries likewise); sums in fp32. Checked against float64 through the whole op
// (python_tests/test_cuda_on_cpu_circulant.py; tolerances 5e-3 fp16, 2e-2 bf16).
#pragma once

#include "fft_smem.cuh"  // (and small_m_regs.cuh: small_m::Pair's mma)

// mma.sync m16n8k16 with bf16 needs sm_80: below it (never launched there) the Stockham FFT is compiled
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define REPARAM_MMA_FFT 0
#else
#define REPARAM_MMA_FFT 1
#endif

namespace reparam {
namespace fft {

// (1/16) DFT(in_scale * Z) of each of the nseq sequences Z of H = 128 or 256 points (forward: sign -1;
// inverse: +1, unnormalized): load(s, n) returns Z[n] of sequence s; emit(s, k, v) takes Z^[k] and
// Z^[k + 1] (k even) as v = (re k, im k, re k + 1, im k + 1), each (s, k) once, in no particular order.
// tw: e^{-2 pi i j / H}, j < H. Every thread of the CTA calls it (after a barrier that made what load
// reads and tw visible); it ends with a barrier.
template <class T, int H, class Load, class Emit>
__device__ __forceinline__ void mma_fft(int nseq, const float2* tw, bool inverse, float in_scale, Load&& load,
                                        Emit&& emit) {
  static_assert(H == 128 || H == 256, "mma_fft: H = 16 x 8 or 16 x 16");
  constexpr int R = H / 16;  // stage B's radix: n = R n2 + n1 (n1 < R), k = k2 + 16 k1 (k1 < R)
  constexpr int NT = R / 8;  // stage A's 8-column tiles (n1 = 8 nt + column)
  using P = small_m::Pair<T>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  auto w = [&](int m) {  // WH^m, conjugated for the inverse
    const float2 v = tw[m & (H - 1)];
    return inverse ? make_float2(v.x, -v.y) : v;
  };
  // Fragment register q of a 16 x 16 operand holds rows g + 8 (q & 1), columns 2t + 8 (q >> 1) and + 1.
  // The 16-point DFT's real form [[C, -S], [S, C]] as its tiles C, S, -S: a_* for stage A (x 1/16),
  // b_* for stage B at R = 16 (unscaled); at R = 8 stage B's whole 16 x 16 matrix is b_re.
  uint32_t a_re[4], a_im[4], a_nim[4], b_re[4], b_im[4], b_nim[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = g + 8 * (q & 1), c = 2 * t + 8 * (q >> 1);
    const float2 w0 = w(R * r * c), w1 = w(R * r * (c + 1));  // W16^(rc), W16^(r(c + 1))
    a_re[q] = P::pack2(w0.x / 16.f, w1.x / 16.f);
    a_im[q] = P::pack2(w0.y / 16.f, w1.y / 16.f);
    a_nim[q] = P::pack2(-w0.y / 16.f, -w1.y / 16.f);
    if constexpr (R == 16) {
      b_re[q] = P::pack2(w0.x, w1.x);
      b_im[q] = P::pack2(w0.y, w1.y);
      b_nim[q] = P::pack2(-w0.y, -w1.y);
    } else {  // rows (re / im out, k1 < 8), columns (re / im in, n1 < 8): [[C, -S], [S, C]] of W8
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k1 = r & 7, n1 = (c + e) & 7, ro = r >> 3, ri = (c + e) >> 3;
        const float2 u = w(2 * R * n1 * k1);
        v[e] = ro == ri ? u.x : ro == 0 ? -u.y : u.y;
      }
      b_re[q] = P::pack2(v[0], v[1]);
    }
  }
  // WH^(n1 k2) at this lane's stage-A outputs: tile nt, accumulator q: k2 = g + 8 (q >> 1), n1 = 8 nt + 2t + (q & 1)
  float2 tw_ab[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) tw_ab[nt][q] = w((8 * nt + 2 * t + (q & 1)) * (g + 8 * (q >> 1)));

  for (int s = threadIdx.x >> 5; s < nseq; s += blockDim.x >> 5) {
    // stage A, column tile nt (n1 = 8 nt + g): Z[R n2 + n1] at n2 = 2t, 2t + 1 (first register), 2t + 8, 2t + 9
    float ar[NT][4], ai[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float2 z[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) z[e] = load(s, R * (2 * t + (e & 1) + 8 * (e >> 1)) + 8 * nt + g);
      const uint32_t re0 = P::pack2(z[0].x * in_scale, z[1].x * in_scale);
      const uint32_t re1 = P::pack2(z[2].x * in_scale, z[3].x * in_scale);
      const uint32_t im0 = P::pack2(z[0].y * in_scale, z[1].y * in_scale);
      const uint32_t im1 = P::pack2(z[2].y * in_scale, z[3].y * in_scale);
#pragma unroll
      for (int q = 0; q < 4; ++q) ar[nt][q] = ai[nt][q] = 0.f;
      P::mma(ar[nt], a_re, re0, re1);  // Ar = C Zr - S Zi
      P::mma(ar[nt], a_nim, im0, im1);
      P::mma(ai[nt], a_im, re0, re1);  // Ai = S Zr + C Zi
      P::mma(ai[nt], a_re, im0, im1);
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // times WH^(n1 k2)
        const float2 v = cmul(make_float2(ar[nt][q], ai[nt][q]), tw_ab[nt][q]);
        ar[nt][q] = v.x;
        ai[nt][q] = v.y;
      }
    }
    // stage B, column tile mt (k2 = g + 8 mt): the operand's rows n1 = 2t, 2t + 1 (+ 8) of the real, then
    // the imaginary half are stage A's accumulators of row k2, packed in pairs
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      if constexpr (R == 8) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        P::mma(d, b_re, P::pack2(ar[0][2 * mt], ar[0][2 * mt + 1]), P::pack2(ai[0][2 * mt], ai[0][2 * mt + 1]));
        // rows k1 = g (real), g + 8 (imaginary); columns k2 = 2t + 8 mt, + 1: k = k2 + 16 g
        emit(s, 16 * g + 8 * mt + 2 * t, make_float4(d[0], d[2], d[1], d[3]));
      } else {
        const uint32_t re0 = P::pack2(ar[0][2 * mt], ar[0][2 * mt + 1]);
        const uint32_t re1 = P::pack2(ar[1][2 * mt], ar[1][2 * mt + 1]);
        const uint32_t im0 = P::pack2(ai[0][2 * mt], ai[0][2 * mt + 1]);
        const uint32_t im1 = P::pack2(ai[1][2 * mt], ai[1][2 * mt + 1]);
        float dr[4] = {0.f, 0.f, 0.f, 0.f}, di[4] = {0.f, 0.f, 0.f, 0.f};
        P::mma(dr, b_re, re0, re1);
        P::mma(dr, b_nim, im0, im1);
        P::mma(di, b_im, re0, re1);
        P::mma(di, b_re, im0, im1);
        // rows k1 = g, g + 8; columns k2 = 2t + 8 mt, + 1: k = k2 + 16 k1
        emit(s, 16 * g + 8 * mt + 2 * t, make_float4(dr[0], di[0], dr[1], di[1]));
        emit(s, 16 * (g + 8) + 8 * mt + 2 * t, make_float4(dr[2], di[2], dr[3], di[3]));
      }
    }
  }
  __syncthreads();
}

}  // namespace fft
}  // namespace reparam
