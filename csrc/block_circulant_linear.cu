// Fused block-circulant linear: y_i = irfft(sum_j S_ij * rfft(x_j)) + bias, ONE launch.
//
// x [M, K] (fp16 / bf16 / fp32), w [p, q, 2, b/2+1] fp32 (real, imag planes of
// the rfft of each block's first column, see compress/structured.py), y [M, N].
// Block sizes b = 64..4096, powers of two.
//
// One CTA owns pi output blocks i0 .. i0+pi-1 and a tile of TM rows (pi = 1 while the grid is
// small, i.e. decode: one CTA per output block; at large M up to 8, so each input FFT serves pi
// output blocks instead of being recomputed for every one). For each chunk of NJ input blocks it
//   1. loads x_j of its rows into shared memory as H = b/2 complex values
//      z[n] = x[2n] + i x[2n+1] (real-input trick: a length-H complex FFT
//      gives the length-b real FFT), zero-padded beyond K;
//   2. runs an in-shared-memory Stockham FFT (radix-4 stages, one radix-2
//      stage when log2 H is odd; ping-pong buffers, natural order out);
//   3. splits the result into the b/2+1 bins of rfft(x_j) (once) and accumulates
//      S_ij * X_j for its pi output blocks into per-row spectrum accumulators
//      (each thread owns (row, bin) pairs and keeps the pi sums in registers for
//      the pass: no races, no atomics).
// Then, per batch of output blocks that fits a buffer, it packs the accumulated
// half spectra into H complex values, runs the inverse FFTs, and writes y (+ bias)
// for the columns < N. No complex intermediate ever leaves shared memory; fp32
// throughout.
//
// Shared memory: two CAP-element complex buffers (64 KB) + the H twiddles of the FFTs
// (<= 16 KB) + pi*TM*(H+1) complex accumulators (16.5 KB per output block). TM = clamp(4096 / b, 1, 16); NJ =
// CAP / (rows*H) input blocks per pass.
//
// The index math of this file was checked against the float64 reference by a
// line-by-line NumPy emulation (all stages, padding, DC/Nyquist handling);
// this session had no GPU to run the kernel itself.
#include "common.cuh"
#include "ops.h"

namespace reparam {
namespace {

constexpr int kThreads = 256;
constexpr int kCap = 4096;  // complex elements per ping-pong buffer
constexpr int kMaxTm = 16;
constexpr int kMaxPi = 8;  // output blocks per CTA (large M: each input FFT serves up to 8 of them)

template <class T>
struct BcArgs {
  const T* x;      // [M, K]
  const float* w;  // [p, q, 2, H+1]
  const T* bias;   // [N] or nullptr
  T* y;            // [M, N]
  int64_t M, K, N;
  int p, q, b, tm, pi;  // pi: output blocks per CTA
};

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

template <class T>
__global__ void __launch_bounds__(kThreads) block_circulant_kernel(BcArgs<T> a) {
  extern __shared__ __align__(16) float2 smem[];
  const int H = a.b >> 1, hb = H + 1;
  float2* buf_a = smem;
  float2* buf_b = smem + kCap;
  float2* tw = smem + 2 * kCap;  // [H] FFT twiddles
  float2* acc = tw + H;          // [np][rows][H+1]
  const int64_t m0 = int64_t(blockIdx.x) * a.tm;
  const int rows = (a.M - m0 < a.tm) ? int(a.M - m0) : a.tm;
  const int i0 = blockIdx.y * a.pi;           // first output block of this CTA
  const int np = min(a.pi, a.p - i0);         // output blocks of this CTA
  const int per_block = rows * hb;            // accumulators per output block

  for (int t = threadIdx.x; t < np * per_block; t += blockDim.x) acc[t] = make_float2(0.f, 0.f);
  for (int t = threadIdx.x; t < H; t += blockDim.x) tw[t] = expipi(-2.f * float(t) / float(H));  // read after the load's barrier

  // as many input blocks per pass as the buffers hold for this CTA's rows (M < TM: more blocks)
  const int nj_max = kCap / (rows * H);
  for (int j0 = 0; j0 < a.q; j0 += nj_max) {
    const int nj = min(nj_max, a.q - j0), nseq = nj * rows;
    // 1. load: sequence s = jj * rows + mm holds x[m0 + mm, (j0 + jj) * b ...] packed in pairs
    for (int t = threadIdx.x; t < nseq * H; t += blockDim.x) {
      const int s = t / H, n = t - s * H;
      const int jj = s / rows, mm = s - jj * rows;
      const int64_t col = int64_t(j0 + jj) * a.b + 2 * n;
      const T* xr = a.x + (m0 + mm) * a.K;
      const float re = col < a.K ? to_f32<T>(xr[col]) : 0.f;
      const float im = col + 1 < a.K ? to_f32<T>(xr[col + 1]) : 0.f;
      buf_a[s * H + n] = make_float2(re, im);
    }
    __syncthreads();
    // 2. forward FFTs
    const float2* res = stockham_fft(buf_a, buf_b, tw, H, nseq, false);
    // 3. real-FFT split + block products: thread owns (mm, k), k = 0..H; X_j[k] is split once and
    //    multiplied into all np output blocks (their sums in registers for the pass)
    for (int t = threadIdx.x; t < per_block; t += blockDim.x) {
      const int mm = t / hb, k = t - mm * hb;
      float2 sum[kMaxPi];
#pragma unroll
      for (int ii = 0; ii < kMaxPi; ++ii)
        if (ii < np) sum[ii] = acc[ii * per_block + t];
      const float2 wk = expipi(-float(k) / float(H));  // e^{-2 pi i k / b}
      for (int jj = 0; jj < nj; ++jj) {
        const float2* z = res + (jj * rows + mm) * H;
        float2 xk;
        if (k == 0 || k == H) {
          const float2 z0 = z[0];
          xk = make_float2(k == 0 ? z0.x + z0.y : z0.x - z0.y, 0.f);
        } else {
          const float2 zk = z[k], zc = z[H - k];
          const float2 c = make_float2(zc.x, -zc.y);         // conj(Z[H-k])
          const float2 e = cscale(cadd(zk, c), 0.5f);          // FFT of even samples
          const float2 o = times_minus_i(cscale(csub(zk, c), 0.5f));  // FFT of odd samples
          xk = cadd(e, cmul(wk, o));
        }
        const float* wj = a.w + (int64_t(i0) * a.q + (j0 + jj)) * 2 * hb;  // block (i0, j0 + jj)
#pragma unroll
        for (int ii = 0; ii < kMaxPi; ++ii) {
          if (ii < np) {
            const float* wij = wj + int64_t(ii) * a.q * 2 * hb;  // block (i0 + ii, j0 + jj)
            sum[ii] = cadd(sum[ii], cmul(make_float2(wij[k], wij[hb + k]), xk));
          }
        }
      }
#pragma unroll
      for (int ii = 0; ii < kMaxPi; ++ii)
        if (ii < np) acc[ii * per_block + t] = sum[ii];
    }
    __syncthreads();  // res (buf_a or buf_b) is overwritten by the next load
  }

  // 4-5, per batch of output blocks that fits a buffer: pack each block's Hermitian half spectrum into
  // H complex values (imag of DC and Nyquist ignored), inverse FFT, write y (+ bias).
  const int per_pass = max(1, kCap / (rows * H));
  const float scale = 1.f / float(H);
  for (int ib = 0; ib < np; ib += per_pass) {
    const int nbk = min(per_pass, np - ib), nseq = nbk * rows;  // sequence s = (ii - ib) * rows + mm
    for (int t = threadIdx.x; t < nseq * H; t += blockDim.x) {
      const int s = t / H, k = t - s * H;
      const float2* am = acc + (ib * rows + s) * hb;  // = acc[ii][mm]
      float2 av, cv;
      if (k == 0) {
        av = make_float2(am[0].x, 0.f);
        cv = make_float2(am[H].x, 0.f);
      } else {
        av = am[k];
        cv = make_float2(am[H - k].x, -am[H - k].y);
      }
      const float2 e = cscale(cadd(av, cv), 0.5f);
      const float2 o = cmul(cscale(csub(av, cv), 0.5f), expipi(float(k) / float(H)));
      buf_a[s * H + k] = cadd(e, times_i(o));
    }
    __syncthreads();
    const float2* res = stockham_fft(buf_a, buf_b, tw, H, nseq, true);
    // y[m0 + mm, (i0 + ii)*b + 2n (+1)] = z[n] / H + bias
    for (int t = threadIdx.x; t < nseq * H; t += blockDim.x) {
      const int s = t / H, n = t - s * H;
      const int ii = ib + s / rows, mm = s % rows;
      const float2 z = res[s * H + n];
      const int64_t col = int64_t(i0 + ii) * a.b + 2 * n;
      T* yr = a.y + (m0 + mm) * a.N;
      if (col < a.N) yr[col] = from_f32<T>(z.x * scale + (a.bias ? to_f32<T>(a.bias[col]) : 0.f));
      if (col + 1 < a.N) yr[col + 1] = from_f32<T>(z.y * scale + (a.bias ? to_f32<T>(a.bias[col + 1]) : 0.f));
    }
    __syncthreads();  // the next batch overwrites the buffers
  }
}

int rows_per_cta(int b) { return std::max(1, std::min(kMaxTm, 4096 / b)); }

size_t smem_bytes(int b, int pi) {  // two buffers, the twiddle table, the accumulators
  return (2 * size_t(kCap) + size_t(b / 2) + size_t(pi) * rows_per_cta(b) * (b / 2 + 1)) * sizeof(float2);
}

int max_smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// Output blocks per CTA: 1 while the grid is small (decode: every output block its own CTA), else the
// largest divisor of p up to kMaxPi that still leaves >= 1 CTA per SM and fits shared memory (with
// pi > 1 a CTA needs > 80 KB, so one runs per SM anyway). Each input FFT then serves pi output
// blocks instead of being recomputed for every one of them.
int choose_pi(int64_t M, int p, int b, int device) {
  const int64_t tiles = (M + rows_per_cta(b) - 1) / rows_per_cta(b);
  const int64_t want = sm_count(device);
  int pi = 1;
  for (int c = 2; c <= std::min(kMaxPi, p); ++c) {
    if (p % c != 0) continue;
    if (tiles * (p / c) < want || smem_bytes(b, c) > size_t(max_smem_optin(device))) break;
    pi = c;
  }
  return pi;
}

template <class T>
void launch(BcArgs<T> a, int device, cudaStream_t stream) {
  auto kernel = block_circulant_kernel<T>;
  static bool configured[64] = {false};  // per template instance and device (> 48 KB needs the opt-in)
  const int slot = (device >= 0 && device < 64) ? device : 0;
  if (!configured[slot]) {
    RK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_optin(device)));
    configured[slot] = true;
  }
  a.tm = rows_per_cta(a.b);
  a.pi = choose_pi(a.M, a.p, a.b, device);
  const dim3 grid(unsigned((a.M + a.tm - 1) / a.tm), unsigned((a.p + a.pi - 1) / a.pi));
  kernel<<<grid, kThreads, smem_bytes(a.b, a.pi), stream>>>(a);
  RK_CUDA_CHECK(cudaGetLastError());
}

template <class F>
void dispatch_float(ScalarType st, const char* op, F&& f) {
  if (st == ScalarType::Half) {
    f(__half{});
  } else if (st == ScalarType::BFloat16) {
    f(__nv_bfloat16{});
  } else if (st == ScalarType::Float) {
    f(float{});
  } else {
    STD_TORCH_CHECK(false, "reparam.", op, ": the CUDA kernel takes float16, bfloat16 or float32 `x`, got ",
                    dtype_name(st), " (the Python wrapper routes float64 to the reference)");
  }
}

}  // namespace

Tensor block_circulant_linear_cuda(Tensor x, Tensor w_spectrum, int64_t block_size, int64_t out_features,
                                   std::optional<Tensor> bias) {
  const char* op = "block_circulant_linear";
  check_x(op, x);
  STD_TORCH_CHECK(block_size >= 64 && block_size <= 4096 && (block_size & (block_size - 1)) == 0,
                  "reparam.block_circulant_linear: the CUDA kernel takes `block_size` a power of two in 64..4096, got ",
                  block_size, " (reparam_kernels.ops.block_circulant_linear routes other sizes to Triton)");
  check_arg(op, "w_spectrum", w_spectrum, x, 4, ScalarType::Float);
  const int64_t b = block_size, p = w_spectrum.size(0), q = w_spectrum.size(1);
  STD_TORCH_CHECK(w_spectrum.size(2) == 2 && w_spectrum.size(3) == b / 2 + 1,
                  "reparam.block_circulant_linear: `w_spectrum` must be [p, q, 2, block_size/2+1]");
  STD_TORCH_CHECK(p >= 1 && q >= 1 && p <= 65535, "reparam.block_circulant_linear: `w_spectrum` must have 1..65535 block rows and >= 1 block columns");
  const int64_t K = x.size(x.dim() - 1), N = out_features;
  STD_TORCH_CHECK((q - 1) * b < K && K <= q * b,
                  "reparam.block_circulant_linear: `x` last dimension does not fit the q block columns of `w_spectrum`");
  STD_TORCH_CHECK((p - 1) * b < N && N <= p * b,
                  "reparam.block_circulant_linear: `out_features` does not fit the p block rows of `w_spectrum`");
  check_bias(op, bias, x, N);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  const int64_t M = xc.numel() / K;
  Tensor y = torch::stable::new_empty(xc, out_shape(xc, N));
  if (M == 0) return y;
  cudaStream_t stream = current_stream(xc);

  dispatch_float(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    BcArgs<T> a;
    a.x = static_cast<const T*>(xc.data_ptr());
    a.w = static_cast<const float*>(w_spectrum.data_ptr());
    a.bias = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    a.y = static_cast<T*>(y.data_ptr());
    a.M = M; a.K = K; a.N = N;
    a.p = int(p); a.q = int(q); a.b = int(b);
    launch<T>(a, xc.get_device_index(), stream);
  });
  return y;
}

}  // namespace reparam
