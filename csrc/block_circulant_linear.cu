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
//   2. runs an in-shared-memory Stockham FFT (fft_smem.cuh: radix-16 passes, the 16-point
//      DFT in registers; ping-pong buffers, swizzled input, natural order out);
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
// (<= 16 KB) + pi*TM*(H+1) complex accumulators (16.5 KB per output block) [+ the staged spectrum
// slice and bias, when they fit]. TM = clamp(4096 / b, 1, 16), halved while the grid leaves SMs
// idle (choose_tm); NJ = CAP / (rows*H) input blocks per pass. M >= 256 (by default) takes
// block_circulant_large_m.cuh instead.
//
// Checked on the CPU through this source (python_tests/test_cuda_on_cpu_circulant.py); timed on an H200
// (benchmarks/results/h200/block_circulant_linear.json): at decode its time is the chain of dependent steps
// in each CTA (~11.6 us at M = 1 for 4096², b = 256), which is why BlockCirculantLinear decodes through
// block_circulant_cols_linear.cu in eval mode.
#include "block_circulant_large_m.cuh"
#include "common.cuh"
#include "fft_smem.cuh"
#include "ops.h"

namespace reparam {
namespace {

using namespace fft;  // complex helpers, stockham_fft, load_pairs, pack_bin, store_blocks

constexpr int kThreads = 256;
constexpr int kCap = 4096;  // complex elements per ping-pong buffer
constexpr int kMaxTm = 16;
constexpr int kMaxPi = 8;  // output blocks per CTA (large M: each input FFT serves up to 8 of them)

template <class T>
struct BcArgs : bc_large_m::Problem<T> {  // x, w, bias, y, M, K, N, p, q, b
  int tm, pi;                              // rows and output blocks per CTA
  int stage_w;                             // 1: the CTA's spectrum slice is copied to shared memory first
};

// Shared memory, in float2 units: two buffers, the twiddles, the accumulators; then (stage_w) the
// CTA's pi x q spectrum blocks as floats, 16-byte aligned, with room for the copy's alignment slack,
// and the bias of its pi * b columns (16-byte aligned: stage_floats is a multiple of 4).
__host__ __device__ inline int64_t smem_float2s(int b, int tm, int pi) {
  return 2 * int64_t(kCap) + b / 2 + int64_t(pi) * tm * (b / 2 + 1);
}
__host__ __device__ inline int64_t stage_offset(int b, int tm, int pi) { return (smem_float2s(b, tm, pi) + 1) & ~int64_t(1); }
__host__ __device__ inline int64_t stage_floats(int b, int pi, int q) { return (int64_t(pi) * q * (b + 2) + 11) & ~int64_t(3); }

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

  // The spectrum blocks (i0 .. i0 + np - 1, all j): read once per (row, bin) in the products below, each
  // input block's values used at once; from global memory those are q dependent round trips per thread.
  // Staged (with the bias, else read only at the very end), they are one batch of cp.async in flight
  // during the x load and the forward FFTs.
  const float* wsrc = a.w + int64_t(i0) * a.q * 2 * hb;  // block (i0, 0); blocks (i, j) at ((i - i0) q + j) 2 hb
  const T* bias_src = a.bias;  // bias_src[c - bias_col0]: column c's bias
  int64_t bias_col0 = 0;
  if (a.stage_w) {  // the host checked that a.w is 16-byte aligned and the slice fits
    float* ws = reinterpret_cast<float*>(smem + stage_offset(a.b, a.tm, a.pi));
    const int shift = int(reinterpret_cast<uintptr_t>(wsrc) & 15);  // 0 or 8 bytes (2 hb floats a block)
    const char* g16 = reinterpret_cast<const char*>(wsrc) - shift;  // still inside w: w itself is aligned
    copy_async(ws, g16, int64_t(np) * a.q * 2 * hb * 4 + shift);
    if (a.bias != nullptr) {  // and the bias of the CTA's columns (i0 b is a multiple of 64 elements)
      T* bs = reinterpret_cast<T*>(ws + stage_floats(a.b, a.pi, a.q));
      copy_async(bs, a.bias + int64_t(i0) * a.b, min(int64_t(np) * a.b, a.N - int64_t(i0) * a.b) * int64_t(sizeof(T)));
      bias_src = bs;
      bias_col0 = int64_t(i0) * a.b;
    }
    cp_async_commit();
    wsrc = ws + shift / 4;
  }
  // zeroed accumulators and the twiddle table (read after the load's barrier), set up while the first
  // chunk of x is in flight
  auto setup = [&] {
    for (int t = threadIdx.x; t < np * per_block; t += blockDim.x) acc[t] = make_float2(0.f, 0.f);
    for (int t = threadIdx.x; t < H; t += blockDim.x) tw[t] = expipi(-2.f * float(t) / float(H));
  };

  // as many input blocks per pass as the buffers hold for this CTA's rows (M < TM: more blocks)
  const int nj_max = kCap / (rows * H);
  for (int j0 = 0; j0 < a.q; j0 += nj_max) {
    const int nj = min(nj_max, a.q - j0), nseq = nj * rows;
    load_pairs(buf_a, buf_b, a.x, m0, rows, rows, a.K, j0, nj, a.b, [&] {  // 1. sequence s = jj * rows + mm
      if (j0 == 0) setup();
    });
    cp_async_wait<0>();  // the staged spectrum (first pass; nothing outstanding later)
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
        const float* wj = wsrc + int64_t(j0 + jj) * 2 * hb;  // block (i0, j0 + jj)
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
      buf_a[swizzled(s * H + k)] = pack_bin(av, cv, k, H);  // stockham_fft's input layout
    }
    __syncthreads();
    const float2* res = stockham_fft(buf_a, buf_b, tw, H, nseq, true);
    store_blocks(res, nseq, rows, rows, i0 + ib, a.b, a.y, bias_src, bias_col0, m0, a.N, 1.f / float(H));
    __syncthreads();  // the next batch overwrites the buffers
  }
}

int rows_per_cta(int b) { return std::max(1, std::min(kMaxTm, 4096 / b)); }

size_t smem_bytes(int b, int tm, int pi) { return size_t(smem_float2s(b, tm, pi)) * sizeof(float2); }

// Rows per CTA: up to rows_per_cta(b) (the buffers hold rows x H x nj), halved while the grid of
// one CTA per (row tile, output block) would leave SMs idle. At M = 16, 4096², b = 256 that is 1 row
// and 256 CTAs instead of 16 rows in 16 CTAs, each making 8 passes one after another.
int choose_tm(int64_t M, int p, int b, int device) {
  const int64_t want = sm_count(device);
  int tm = rows_per_cta(b);
  while (tm > 1 && (M + tm - 1) / tm * p < want) tm /= 2;
  return tm;
}

// Output blocks per CTA: 1 while the grid is small (decode: every output block its own CTA), else the
// largest divisor of p up to kMaxPi that still leaves >= 1 CTA per SM and fits shared memory (with
// pi > 1 a CTA needs > 80 KB, so one runs per SM anyway). Each input FFT then serves pi output
// blocks instead of being recomputed for every one of them.
int choose_pi(int64_t M, int tm, int p, int b, int device) {
  const int64_t tiles = (M + tm - 1) / tm;
  const int64_t want = sm_count(device);
  int pi = 1;
  for (int c = 2; c <= std::min(kMaxPi, p); ++c) {
    if (p % c != 0) continue;
    if (tiles * (p / c) < want || smem_bytes(b, tm, c) > size_t(max_smem_optin(device))) break;
    pi = c;
  }
  return pi;
}

template <class T>
void launch(BcArgs<T> a, int device, cudaStream_t stream) {
  if (bc_large_m::try_launch<T>(a, device, stream)) return;  // large M: spectrum sums in registers
  auto kernel = block_circulant_kernel<T>;
  allow_smem_optin<block_circulant_kernel<T>>(device);
  a.tm = choose_tm(a.M, a.p, a.b, device);
  a.pi = choose_pi(a.M, a.tm, a.p, a.b, device);
  // stage the spectrum slice and the bias when they fit beside the rest (decode: q (b + 2) floats,
  // 16.5 KB for 4096² at b = 256) and the copies' 16-byte source alignment holds
  const size_t staged = size_t(stage_offset(a.b, a.tm, a.pi)) * sizeof(float2) +
                        size_t(stage_floats(a.b, a.pi, a.q)) * sizeof(float) +
                        (a.bias != nullptr ? size_t(a.pi) * a.b * sizeof(T) : 0);
  a.stage_w = staged <= size_t(max_smem_optin(device)) &&
              (reinterpret_cast<uintptr_t>(a.w) | reinterpret_cast<uintptr_t>(a.bias)) % 16 == 0;
  const dim3 grid(unsigned((a.M + a.tm - 1) / a.tm), unsigned((a.p + a.pi - 1) / a.pi));
  kernel<<<grid, kThreads, a.stage_w ? staged : smem_bytes(a.b, a.tm, a.pi), stream>>>(a);
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
  check_block_grid(op, "w_spectrum", p, q, b, K, N);
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
