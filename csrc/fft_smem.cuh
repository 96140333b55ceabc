// Shared-memory FFT pieces of the block-circulant kernels (block_circulant_linear.cu: one CTA per
// output block group, any M; block_circulant_large_m.cuh: spectra accumulated in registers, large M):
// complex arithmetic on float2, e^{i pi t}, the Stockham FFT, x loaded as complex pairs and y
// stored from the inverse transforms.
#pragma once

#include "common.cuh"
#include "small_m_regs.cuh"

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

// kV when the caller fixes it at compile time (kV > 0), else the runtime v. One body serves the general
// kernel (block size and rows per CTA known only at run time) and the large-M kernel (both template
// constants): there every index division by H or by the rows becomes a shift — a runtime 32-bit
// division is ~20 instructions, and the large-M kernel's loads, packing and stores did one or two per
// element (most of its instructions: block_circulant_large_m.cuh).
template <int kV>
__device__ __forceinline__ int fixed(int v) {
  return kV > 0 ? kV : v;
}

// W_R^e = e^{-2 pi i e / R} (forward; conjugated for the inverse) for R = 16 and 8, e a compile-time
// constant after unrolling: the DFTs' internal twiddles cost no table read.
__device__ __forceinline__ float2 w16(int e, bool inverse) {
  constexpr float c1 = 0.92387953251128674f, s1 = 0.38268343236508977f, h = 0.70710678118654752f;
  float2 w;
  switch (e & 15) {
    case 0: w = make_float2(1.f, 0.f); break;
    case 1: w = make_float2(c1, -s1); break;
    case 2: w = make_float2(h, -h); break;
    case 3: w = make_float2(s1, -c1); break;
    case 4: w = make_float2(0.f, -1.f); break;
    case 5: w = make_float2(-s1, -c1); break;
    case 6: w = make_float2(-h, -h); break;
    case 7: w = make_float2(-c1, -s1); break;
    case 8: w = make_float2(-1.f, 0.f); break;
    case 9: w = make_float2(-c1, s1); break;
    default: w = make_float2(0.f, 0.f); break;  // a k1 <= 9: never reached
  }
  return inverse ? make_float2(w.x, -w.y) : w;
}

__device__ __forceinline__ void dft2(float2& a, float2& b) {
  const float2 t = a;
  a = cadd(t, b);
  b = csub(t, b);
}

// In-register DFT of v[o], v[o + st], v[o + 2 st], v[o + 3 st] (natural order in the same slots).
template <int N>
__device__ __forceinline__ void dft4(float2 (&v)[N], int o, int st, bool inverse) {
  const float2 v0 = v[o], v1 = v[o + st], v2 = v[o + 2 * st], v3 = v[o + 3 * st];
  const float2 s02 = cadd(v0, v2), d02 = csub(v0, v2), s13 = cadd(v1, v3), d13 = csub(v1, v3);
  const float2 jd13 = inverse ? times_i(d13) : times_minus_i(d13);
  v[o] = cadd(s02, s13);
  v[o + st] = cadd(d02, jd13);
  v[o + 2 * st] = csub(s02, s13);
  v[o + 3 * st] = csub(d02, jd13);
}

// In-register DFT of R = 2, 4, 8 or 16 values, natural order in and out. R = 4 R1 as
// X[k1 + 4 k2] = sum_a W_R^{a k1} W_R1^{a k2} sum_n2 x[a + R1 n2] W_4^{n2 k1}: R1 DFT4s over n2,
// the twiddles W_R^{a k1}, then four DFT_R1s over a (their results land transposed, fixed on return).
template <int R>
__device__ __forceinline__ void dft(float2 (&v)[R], bool inverse) {
  if constexpr (R == 2) {
    dft2(v[0], v[1]);
  } else if constexpr (R == 4) {
    dft4(v, 0, 1, inverse);
  } else {
    constexpr int R1 = R / 4;
#pragma unroll
    for (int a = 0; a < R1; ++a) dft4(v, a, R1, inverse);  // Y[a][k1] at v[a + R1 k1]
#pragma unroll
    for (int a = 1; a < R1; ++a)
#pragma unroll
      for (int k1 = 1; k1 < 4; ++k1) v[a + R1 * k1] = cmul(v[a + R1 * k1], w16(a * k1 * (16 / R), inverse));
    float2 u[R];
#pragma unroll
    for (int k1 = 0; k1 < 4; ++k1) {  // DFT_R1 over a of Y[a][k1] -> X[k1 + 4 k2]
      if constexpr (R1 == 4) {
        float2 y[4] = {v[R1 * k1], v[1 + R1 * k1], v[2 + R1 * k1], v[3 + R1 * k1]};
        dft4(y, 0, 1, inverse);
#pragma unroll
        for (int k2 = 0; k2 < 4; ++k2) u[k1 + 4 * k2] = y[k2];
      } else {  // R1 == 2
        float2 y0 = v[R1 * k1], y1 = v[1 + R1 * k1];
        dft2(y0, y1);
        u[k1] = y0;
        u[k1 + 4] = y1;
      }
    }
#pragma unroll
    for (int m = 0; m < R; ++m) v[m] = u[m];
  }
}

// Index i of a buffer, XOR-swizzled inside its 128-byte line (16 float2) by the line number: the
// layout of the FFT's input and of the values between its first two passes. The first pass writes 16
// consecutive values a thread (plain, a half-warp's stores would all hit the same banks) and, for
// H < 256, reads runs shorter than a line from sequences a multiple of 1 KB apart (plain, the same
// banks again); a pass reading 16 consecutive values across threads sees a permutation of one line.
// Writers of the input (x loading, the spectrum packing) store consecutive indices: no cost there.
// (python_tests/test_fft_bank_model.py counts the wavefronts.)
__device__ __forceinline__ int swizzled(int i) { return i ^ ((i >> 4) & 15); }

// One radix-R Stockham pass over nseq sequences of length H: butterfly j of sequence s reads
// in[s H + j + m H / R] (m < R), multiplies by w^m, w = e^{-+2 pi i k / (ns R)} (k = j mod ns) from the
// table, transforms, and writes out[s H + (j - k) R + k + m ns]. swz_in / swz_out: that side uses
// the swizzled layout.
template <int R, int kH = 0, int kNs = 0>
__device__ __forceinline__ void stockham_pass(const float2* in, float2* out, const float2* tw, int H, int nseq, int ns,
                                              bool inverse, bool swz_in, bool swz_out) {
  H = fixed<kH>(H);
  ns = fixed<kNs>(ns);
  const int nb = H / R;
  for (int t = threadIdx.x; t < nseq * nb; t += blockDim.x) {
    const int s = t / nb, j = t - s * nb;
    const int k = j & (ns - 1);
    const int base = s * H, idx = base + (j - k) * R + k;
    float2 v[R];
#pragma unroll
    for (int m = 0; m < R; ++m) {
      const int i = base + j + m * nb;
      v[m] = in[swz_in ? swizzled(i) : i];
    }
    if (ns > 1) {  // the first pass's twiddles are all 1
      const float2 tk = tw[k * (H / (ns * R))];
      // w^m as a tree, w^m = w^p w^(m - p) (p the largest power of two <= m; w^p = (w^(p/2))^2): the same
      // R - 2 multiplies as a running product, but 4 deep instead of 14 (latency on the decode path)
      float2 wp[R];
      wp[1] = inverse ? make_float2(tk.x, -tk.y) : tk;
#pragma unroll
      for (int m = 2; m < R; ++m) {
        const int p = m >= 8 ? 8 : m >= 4 ? 4 : 2;  // the largest power of two <= m (m < 16)
        wp[m] = p == m ? cmul(wp[m / 2], wp[m / 2]) : cmul(wp[p], wp[m - p]);
      }
#pragma unroll
      for (int m = 1; m < R; ++m) v[m] = cmul(v[m], wp[m]);
    }
    dft<R>(v, inverse);
#pragma unroll
    for (int m = 0; m < R; ++m) {
      const int i = idx + m * ns;
      out[swz_out ? swizzled(i) : i] = v[m];
    }
  }
  __syncthreads();
}

// Which passes use the swizzled layout: the input (read by the pass at ns = 1) and the values between
// the first two passes (written at ns = 1 when another pass follows, read at ns = 16).
__device__ __forceinline__ constexpr bool reads_swizzled(int ns) { return ns == 1 || ns == 16; }
__device__ __forceinline__ constexpr bool writes_swizzled(int ns, int R, int H) { return ns == 1 && R < H; }

// Stockham FFT of `nseq` sequences of length H (power of two, 32 .. 4096) stored back to back in
// `in`, at swizzled(i) for the value i (s H + n); `out` is scratch of the same size. Forward: sign -1, inverse: +1, unnormalized. `tw` holds the
// twiddles e^{-2 pi i j / H}, j < H. Radix-16 passes (the 16-point DFT in registers), the last one of
// radix H / ns in {2, 4, 8, 16}: 2 passes for H = 128, 3 for H = 2048 (radix-4 stages took 4 and 6
// round trips through shared memory and barriers). Returns the buffer holding the result (natural
// order). Every thread of the CTA must call it; the caller synchronizes before (inputs and tw
// written) — each pass ends with a barrier, so the result is visible on return.
__device__ float2* stockham_fft(float2* in, float2* out, const float2* tw, int H, int nseq, bool inverse) {
  for (int ns = 1; ns < H;) {
    const int R = H / ns >= 16 ? 16 : H / ns;  // uniform across the CTA
    const bool swz_in = reads_swizzled(ns), swz_out = writes_swizzled(ns, R, H);
    if (R == 16) stockham_pass<16>(in, out, tw, H, nseq, ns, inverse, swz_in, swz_out);
    else if (R == 8) stockham_pass<8>(in, out, tw, H, nseq, ns, inverse, swz_in, swz_out);
    else if (R == 4) stockham_pass<4>(in, out, tw, H, nseq, ns, inverse, swz_in, swz_out);
    else stockham_pass<2>(in, out, tw, H, nseq, ns, inverse, swz_in, swz_out);
    float2* tmp = in;
    in = out;
    out = tmp;
    ns *= R;
  }
  return in;
}

// The same passes for a compile-time H (every pass's radix, stride and swizzle flags constants).
template <int H, int NS = 1>
__device__ __forceinline__ float2* stockham_fft_fixed(float2* in, float2* out, const float2* tw, int nseq,
                                                      bool inverse) {
  if constexpr (NS >= H) {
    return in;
  } else {
    constexpr int R = H / NS >= 16 ? 16 : H / NS;
    stockham_pass<R, H, NS>(in, out, tw, H, nseq, NS, inverse, reads_swizzled(NS), writes_swizzled(NS, R, H));
    return stockham_fft_fixed<H, NS * R>(out, in, tw, nseq, inverse);
  }
}

// Copies nbytes from global src to shared dst (both 16-byte aligned) by 16-byte cp.async, the CTA's
// threads together, the last chunk zero-filled past nbytes. Not committed: the caller commits and waits.
// The last chunk, when partial, is copied by plain loads: a 16-byte cp.async with a smaller src-size
// reads only src-size bytes, but its 16-byte window crosses the end of the allocation and
// compute-sanitizer's memcheck reports that as an out-of-bounds read (it did, on an H200).
__device__ __forceinline__ void copy_async(void* dst, const void* src, int64_t nbytes) {
  char* d = static_cast<char*>(dst);
  const char* g = static_cast<const char*>(src);
  for (int64_t c = threadIdx.x; c * 16 < nbytes; c += blockDim.x) {
    const int64_t left = nbytes - 16 * c;
    if (left >= 16) {
      cp_async16(d + 16 * c, g + 16 * c, 16);
    } else {
      for (int i = 0; i < 16; ++i) d[16 * c + i] = i < left ? g[16 * c + i] : char(0);
    }
  }
}

// (p[0], p[1]) as floats by one access of two elements, and its store: p aligned to two elements
// (16-bit T: a half2 / bfloat162 word, small_m::Pair).
template <class T>
__device__ __forceinline__ float2 load_pair(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float2*>(p);
  } else {
    const auto& v = small_m::Pair<T>::val(*reinterpret_cast<const uint32_t*>(p));
    return make_float2(to_f32<T>(v.x), to_f32<T>(v.y));
  }
}
template <class T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(p) = small_m::Pair<T>::pack2(a, b);
  }
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
// FFT), zero beyond K and for rows >= live_rows (a tile's rows past M: the large-M kernel keeps its
// layout at TM rows). Sequence s = jj * rows + mm goes to buf[s * H ..] (swizzled: stockham_fft's input
// layout). `scratch` (as large as buf, free until the FFT) takes the raw rows: when x's rows are 16-byte
// aligned, all of them are copied by cp.async at once — one memory round trip for the whole chunk, where
// register batches take one per 8 pairs a thread (4 at M = 2048 in the large-M kernel) — then converted
// from shared memory. while_copying() runs once, while the copies are in flight (independent setup:
// the twiddle table, zeroed accumulators). Every thread must call it (it synchronizes inside); no
// barrier at the end. kB, kRows: b and rows when fixed at compile time (fixed()). kRaw: only the raw
// rows, in `scratch` as [s][b] elements of T, zero beyond K and for rows >= live_rows (the tensor-core
// FFT reads its operands from them: fft_mma.cuh); `buf` is not written.
template <int kB = 0, int kRows = 0, bool kRaw = false, class T, class F>
__device__ void load_pairs(float2* buf, float2* scratch, const T* x, int64_t m0, int rows, int live_rows, int64_t K,
                           int j0, int nj, int b, F&& while_copying) {
  b = fixed<kB>(b);
  rows = fixed<kRows>(rows);
  const int H = b >> 1, nseq = nj * rows;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (K * int64_t(sizeof(T))) % 16 == 0;
  if (aligned) {  // raw sequence s at raw[s * b ..]: nseq * b * sizeof(T) <= 2 * H * nseq * 8 bytes fits
    constexpr int kPer = 16 / int(sizeof(T));  // elements per 16-byte chunk
    const int chunks = b / kPer;              // per sequence (b >= 64)
    char* raw = reinterpret_cast<char*>(scratch);
    for (int c = threadIdx.x; c < nseq * chunks; c += blockDim.x) {
      const int sq = int(unsigned(c) / unsigned(chunks)), cc = c - sq * chunks;
      const int jj = int(unsigned(sq) / unsigned(rows)), mm = sq - jj * rows;
      const int64_t col = int64_t(j0 + jj) * b + int64_t(cc) * kPer;
      const int64_t left = (K - col) * int64_t(sizeof(T));  // bytes of this row from col on
      if (left > 0 && mm < live_rows)
        cp_async16(raw + 16 * int64_t(c), x + (m0 + mm) * K + col, left < 16 ? int(left) : 16);
      else if (kRaw)  // (left is a multiple of 16 here: K * sizeof(T) is)
        *reinterpret_cast<uint4*>(raw + 16 * int64_t(c)) = make_uint4(0u, 0u, 0u, 0u);
    }
    cp_async_commit();
    while_copying();
    cp_async_wait<0>();
    if constexpr (kRaw) return;
    __syncthreads();
    const T* rv = reinterpret_cast<const T*>(scratch);
    for (int t = threadIdx.x; t < nseq * H; t += blockDim.x) {
      const int sq = int(unsigned(t) / unsigned(H)), n = t - sq * H;
      const int jj = int(unsigned(sq) / unsigned(rows)), mm = sq - jj * rows;
      const int64_t col = int64_t(j0 + jj) * b + 2 * n;
      const bool live = live_rows >= rows || mm < live_rows;  // rows past it were not copied: select
      const T* r = rv + int64_t(sq) * b + 2 * n;
      buf[swizzled(t)] = live && col + 1 < K ? load_pair(r) : make_float2(live && col < K ? to_f32<T>(r[0]) : 0.f, 0.f);
    }
    return;
  }
  while_copying();
  batched<float2>(
      nseq * H,
      [&](int t) {
        const int sq = t / H, n = t - sq * H;
        const int jj = sq / rows, mm = sq - jj * rows;
        const int64_t col = int64_t(j0 + jj) * b + 2 * n;
        const T* xr = x + (m0 + (mm < live_rows ? mm : 0)) * K;
        const bool live = mm < live_rows;
        return make_float2(live && col < K ? to_f32<T>(xr[col]) : 0.f,
                           live && col + 1 < K ? to_f32<T>(xr[col + 1]) : 0.f);
      },
      [&](int t, float2 v) {
        if constexpr (kRaw) {  // (v holds two values of T: exact)
          const int sq = int(unsigned(t) / unsigned(H)), n = t - sq * H;
          store_pair(reinterpret_cast<T*>(scratch) + int64_t(sq) * b + 2 * n, v.x, v.y);
        } else {
          buf[swizzled(t)] = v;  // t = s * H + n, in stockham_fft's input layout
        }
      });
}

// z = av + i * (the odd part) for one bin k of the inverse real FFT: av = A[k], cv = conj(A[H - k])
// of a Hermitian half spectrum A (for k = 0: the real DC and Nyquist values, imaginary parts 0).
// w = e^{i pi k / H}, from a table or computed (the overload below).
__device__ __forceinline__ float2 pack_bin(float2 av, float2 cv, float2 w) {
  const float2 e = cscale(cadd(av, cv), 0.5f);
  const float2 o = cmul(cscale(csub(av, cv), 0.5f), w);
  return cadd(e, times_i(o));
}
__device__ __forceinline__ float2 pack_bin(float2 av, float2 cv, int k, int H) {
  return pack_bin(av, cv, expipi(float(k) / float(H)));
}

// y[m0 + mm, (i0 + s / rows) * b + 2n (+1)] = res[s][n] * scale + bias for the nseq inverse transforms in
// res (sequence s = output block (s / rows) of the group starting at i0, row mm = s % rows); columns
// >= N and rows >= live_rows dropped. No barrier. bias[c - bias_col0] is column c's bias (a copy in
// shared memory of the CTA's columns, or all of it with bias_col0 = 0), loaded in batches before use.
// kB, kRows: b and rows when fixed at compile time (fixed()).
template <int kB = 0, int kRows = 0, class T>
__device__ void store_blocks(const float2* res, int nseq, int rows, int live_rows, int i0, int b, T* y, const T* bias,
                             int64_t bias_col0, int64_t m0, int64_t N, float scale) {
  b = fixed<kB>(b);
  rows = fixed<kRows>(rows);
  const int H = b >> 1;
  // a column pair (even col, col + 1) as one access when in range and aligned: N even (then col < N
  // means col + 1 < N too), y and the bias aligned to two elements (bias_col0 is even)
  const bool pairs =
      N % 2 == 0 && (reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(bias)) % (2 * sizeof(T)) == 0;
  // (unsigned: the divisions are shifts when b and rows are fixed)
  auto column = [&](int t) {
    return int64_t(i0 + unsigned(t) / unsigned(H) / unsigned(rows)) * b + 2 * (unsigned(t) % unsigned(H));
  };
  batched<float2>(
      nseq * H,
      [&](int t) {
        if (bias == nullptr) return make_float2(0.f, 0.f);
        const int64_t col = column(t);
        const T* bc = bias + (col - bias_col0);
        if (pairs && col < N) return load_pair(bc);
        return make_float2(col < N ? to_f32<T>(bc[0]) : 0.f, col + 1 < N ? to_f32<T>(bc[1]) : 0.f);
      },
      [&](int t, float2 bv) {
        const int mm = int(unsigned(t) / unsigned(H) % unsigned(rows));
        if (mm >= live_rows) return;
        const int64_t col = column(t);
        const float2 z = res[t];
        T* yc = y + (m0 + mm) * N + col;
        const float v0 = z.x * scale + bv.x, v1 = z.y * scale + bv.y;
        if (pairs && col < N) {
          store_pair(yc, v0, v1);
        } else {
          if (col < N) yc[0] = from_f32<T>(v0);
          if (col + 1 < N) yc[1] = from_f32<T>(v1);
        }
      });
}

}  // namespace fft
}  // namespace reparam
