// Shared-memory FFT pieces of the block-circulant kernels (block_circulant_linear.cu: one CTA per
// output block group, any M; block_circulant_large_m.cuh: spectra accumulated in registers, large M):
// complex arithmetic on float2, e^{i pi t}, the Stockham FFT, x loaded as complex pairs and y
// stored from the inverse transforms.
#pragma once

#include "common.cuh"

namespace reparam {
namespace fft {

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 cadd(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float2 csub(float2 a, float2 b) { return make_float2(a.x - b.x, a.y - b.y); }
__device__ __forceinline__ float2 cscale(float2 a, float s) { return make_float2(a.x * s, a.y * s); }
// i * a (forward FFT4 uses -i, inverse +i)
__device__ __forceinline__ float2 times_i(float2 a) { return make_float2(-a.y, a.x); }
__device__ __forceinline__ float2 times_minus_i(float2 a) { return make_float2(a.y, -a.x); }
// e^{i pi t}
__device__ __forceinline__ float2 expipi(float t) {
  float s, c;
  sincospif(t, &s, &c);
  return make_float2(c, s);
}

// Stockham FFT of `nseq` sequences of length H (power of two, >= 2) stored back
// to back in `in`; `out` is scratch of the same size. Forward: sign -1,
// inverse: +1, unnormalized. `tw` holds the twiddles e^{-2 pi i j / H}, j < H
// (a stage's e^{-2 pi i k / (ns R)} is tw[k H / (ns R)]: one shared-memory read
// instead of a sincospif per butterfly). Returns the buffer holding the result
// (natural order). Every thread of the CTA must call it (it synchronizes per
// stage); the caller synchronizes before (inputs and tw written) — the last
// stage ends with a barrier, so the result is visible on return.
__device__ float2* stockham_fft(float2* in, float2* out, const float2* tw, int H, int nseq, bool inverse) {
  for (int ns = 1; ns < H;) {
    const int R = (H / ns >= 4) ? 4 : 2;  // uniform across the CTA
    const int nb = H / R;                 // butterflies per sequence
    for (int t = threadIdx.x; t < nseq * nb; t += blockDim.x) {
      const int s = t / nb, j = t - s * nb;
      const int k = j & (ns - 1);
      const float2* src = in + s * H;
      float2* dst = out + s * H;
      const int idx = (j / ns) * ns * R + k;
      const float2 tk = tw[k * (H / (ns * R))];
      const float2 w = inverse ? make_float2(tk.x, -tk.y) : tk;
      if (R == 4) {
        const float2 w2 = cmul(w, w);
        const float2 v0 = src[j];
        const float2 v1 = cmul(src[j + nb], w);
        const float2 v2 = cmul(src[j + 2 * nb], w2);
        const float2 v3 = cmul(src[j + 3 * nb], cmul(w2, w));
        const float2 s02 = cadd(v0, v2), d02 = csub(v0, v2);
        const float2 s13 = cadd(v1, v3), d13 = csub(v1, v3);
        const float2 jd13 = inverse ? times_i(d13) : times_minus_i(d13);
        dst[idx] = cadd(s02, s13);
        dst[idx + ns] = cadd(d02, jd13);
        dst[idx + 2 * ns] = csub(s02, s13);
        dst[idx + 3 * ns] = csub(d02, jd13);
      } else {
        const float2 v0 = src[j];
        const float2 v1 = cmul(src[j + nb], w);
        dst[idx] = cadd(v0, v1);
        dst[idx + ns] = csub(v0, v1);
      }
    }
    __syncthreads();
    float2* tmp = in;
    in = out;
    out = tmp;
    ns *= R;
  }
  return in;
}

// Runs v = load(t) for kBatch indices t < total of this thread, then use(t, v) for each: a batch's
// global loads are in flight together instead of one round trip per index (at M = 1, b = 4096 a
// thread has 8 pairs of x to load; one at a time that is 8 DRAM round trips).
constexpr int kBatch = 8;

template <class V, class Load, class Use>
__device__ __forceinline__ void batched(int total, Load load, Use use) {
  for (int t0 = 0; t0 < total; t0 += kBatch * int(blockDim.x)) {
    V v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int t = t0 + u * int(blockDim.x) + int(threadIdx.x);
      v[u] = t < total ? load(t) : V{};
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int t = t0 + u * int(blockDim.x) + int(threadIdx.x);
      if (t < total) use(t, v[u]);
    }
  }
}

// Loads x rows m0 .. m0 + rows - 1, input blocks j0 .. j0 + nj - 1, as H = b / 2 complex pairs
// z[n] = x[2n] + i x[2n + 1] (the real-input trick: a length-H complex FFT gives the length-b real
// FFT), zero beyond K. Sequence s = jj * rows + mm goes to buf[s * H ..]. No barrier.
template <class T>
__device__ void load_pairs(float2* buf, const T* x, int64_t m0, int rows, int64_t K, int j0, int nj, int b) {
  const int H = b >> 1;
  batched<float2>(
      nj * rows * H,
      [&](int t) {
        const int s = t / H, n = t - s * H;
        const int jj = s / rows, mm = s - jj * rows;
        const int64_t col = int64_t(j0 + jj) * b + 2 * n;
        const T* xr = x + (m0 + mm) * K;
        return make_float2(col < K ? to_f32<T>(xr[col]) : 0.f, col + 1 < K ? to_f32<T>(xr[col + 1]) : 0.f);
      },
      [&](int t, float2 v) { buf[t] = v; });  // t = s * H + n
}

// z = av + i * (the odd part) for one bin k of the inverse real FFT: av = A[k], cv = conj(A[H - k])
// of a Hermitian half spectrum A (for k = 0: the real DC and Nyquist values, imaginary parts 0).
__device__ __forceinline__ float2 pack_bin(float2 av, float2 cv, int k, int H) {
  const float2 e = cscale(cadd(av, cv), 0.5f);
  const float2 o = cmul(cscale(csub(av, cv), 0.5f), expipi(float(k) / float(H)));
  return cadd(e, times_i(o));
}

// y[m0 + mm, (i0 + s / rows) * b + 2n (+1)] = res[s][n] / H + bias for the nseq inverse transforms in
// res (sequence s = output block (s / rows) of the group starting at i0, row mm = s % rows); columns
// >= N dropped. No barrier. bias[c - bias_col0] is column c's bias (a copy in shared memory of the
// CTA's columns, or all of it with bias_col0 = 0), loaded in batches before use.
template <class T>
__device__ void store_blocks(const float2* res, int nseq, int rows, int i0, int b, T* y, const T* bias,
                             int64_t bias_col0, int64_t m0, int64_t N) {
  const int H = b >> 1;
  const float scale = 1.f / float(H);
  auto column = [&](int t) { return int64_t(i0 + t / H / rows) * b + 2 * (t % H); };
  batched<float2>(
      nseq * H,
      [&](int t) {
        const int64_t col = column(t);
        const T* bc = bias + (col - bias_col0);
        return bias == nullptr ? make_float2(0.f, 0.f)
                               : make_float2(col < N ? to_f32<T>(bc[0]) : 0.f, col + 1 < N ? to_f32<T>(bc[1]) : 0.f);
      },
      [&](int t, float2 bv) {
        const int64_t col = column(t);
        const float2 z = res[t];
        T* yr = y + (m0 + (t / H) % rows) * N;
        if (col < N) yr[col] = from_f32<T>(z.x * scale + bv.x);
        if (col + 1 < N) yr[col + 1] = from_f32<T>(z.y * scale + bv.y);
      });
}

}  // namespace fft
}  // namespace reparam
