// Block-circulant linear from the blocks' first columns, on tensor cores: the decode path (M <= 16).
//
// y = W x + bias, W [N, K] made of b x b circulant blocks; block (i, j) is given by its first column
// c_ij: W[i b + n][j b + m] = c_ij[(n - m) mod b]. w_cols [p, q, b] fp32 (BlockCirculantLinear keeps it
// beside the spectrum it trains: the irfft of each block's spectrum).
//
// Why a second kernel: the FFT kernel (block_circulant_linear.cu) is a chain of dependent steps inside
// one CTA per output block — x's transforms, the products, the inverse transform, each a few passes
// with barriers, by few threads — and the H200 measured it at ~11.6 us for 4096², b = 256, M = 1
// whatever the block size (the dense GEMV: 13.8 us). Here the product is what a dense GEMM does, N K
// multiply-adds per row on mma.sync, but the weights are b times smaller and the work splits into as
// many independent warps as the GPU holds, each one memory round trip deep:
//
// A 16 x 16 tile of a circulant block is Toeplitz: A[r][k] = c[D + r - k] (indices mod b), D = the
// tile's first output minus its first input, within the block. Its m16n8k16 A fragment (lane: g =
// lane / 4, t = lane % 4; registers {row g, cols 2t..}, {row g + 8, cols 2t..}, {row g, cols 2t + 8..},
// {row g + 8, cols 2t + 8..}) is therefore {u(D), u(D + 8), u(D - 8), u(D)} with
//     u(e) = (c[e + g - 2t], c[e + g - 2t - 1])   (low half, high half),
// one register per multiple of 8 of e. A warp's tile of kNT x C mma tiles (64 outputs, 16 C inputs)
// needs the 2 (kNT + C) - 1 registers u(E + 8 s) (C = 16: 39 for 64 mma per 8 rows) instead of 4
// registers per tile: the warp converts the window of pairs they come from (320 at C = 16) into its
// shared memory, then each is one LDS at a constant offset. x is the B operand, x^T: {x[g][k0 + 2t..],
// x[g][k0 + 2t + 8..]}, straight from global memory.
//
// Grid: (output tiles of 64, K splits, row tiles of 8 RG rows). A split is 4 cpc chunks of min(b, 256)
// inputs (a chunk never crosses a block), cpc for each of the CTA's 4 warps; the warps' sums meet in
// shared memory. With more than one split each CTA writes fp32 partials and the last to arrive sums them
// in split order (split_k_counters.h). All global loads of a chunk are issued before its first mma.
// REPARAM_BC_COLS_WIDE=1 (off until timed): one wide CTA a tile instead (16 or 8 warps, its chunks shared by
// them and summed in shared memory, K never split over CTAs) wherever the wide CTAs all fit at once: launch().
// Checked on the CPU through this source (python_tests/test_cuda_on_cpu_circulant_cols.py); the default plan
// was timed on the H200 (run 3), the wide CTA not yet.
#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "ops.h"
#include "small_m_regs.cuh"
#include "split_k_counters.h"

namespace reparam {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kNT = 4;                 // 16-output mma tiles per warp
constexpr int kWarpOuts = 16 * kNT;    // 64: inside one block row (b >= 64)
constexpr int kMaxChunk = 256;         // inputs per chunk: 16 k-tiles

template <class T>
struct ColsArgs {
  const T* x;
  const float* w;     // [p, q, b]
  const T* bias;
  T* y;
  float* part;        // [splits, M, N] when splits > 1
  unsigned* counters;
  int64_t M, K, N;
  int q, b, log2b;    // b is a power of two: blocks and offsets by shifts and masks
  int chunk, chunks;  // inputs per chunk (min(b, 256)), chunks along K
  int cpc, splits;    // chunks per warp (a split: W cpc chunks, W the CTA's warps), K splits
  bool x_aligned4;    // x's rows start on 4-byte boundaries: pairs load as one word
};

// x[row][k], x[row][k + 1] as a half2 / bfloat162 word (low half = k), zero past K or M.
template <class T>
__device__ __forceinline__ uint32_t x_pair(const ColsArgs<T>& a, int64_t row, int64_t k) {
  if (row >= a.M || k >= a.K) return 0u;
  const T* p = a.x + row * a.K + k;
  if (a.x_aligned4 && k + 1 < a.K) return __ldg(reinterpret_cast<const unsigned*>(p));
  const uint32_t lo = small_m::load16(p);
  return k + 1 < a.K ? lo | (small_m::load16(p + 1) << 16) : lo;
}

// The pairs a warp's chunk reads: u(E + 8 s) for s < NU, lane (g, t) at index E + 8 s + g - 2 t, and
// g - 2 t in -6 .. 7: a window of 8 (NU - 1) + 14 consecutive pair indices starting at E - 6.
template <int C>
constexpr int num_u() {
  return 2 * (kNT + C) - 1;
}
template <int C>
constexpr int window_per_lane() {
  return (8 * (num_u<C>() - 1) + 14 + 31) / 32;
}

// Warp tile: outputs n0 .. n0 + 63 (inside block row i, n_loc = n0 - i b), rows m0 + 8 r + .., over
// the chunks c_lo, c_lo + W, .. < c_hi; acc[r][a] is the C fragment of output tile a, row group r.
// Per chunk the warp first writes its window of pairs, converted, to `pw` (its own shared memory): the
// fragments' 39 registers are then one LDS each at a constant offset (from global memory each cost two
// loads, two index computations with the wrap mod b and a convert).
template <class T, int C, int RG, int W>
__device__ __forceinline__ void warp_tile(const ColsArgs<T>& a, int64_t n0, int64_t m0, int c_lo, int c_hi,
                                          uint32_t* pw, float (&acc)[RG][kNT][4]) {
  using P = small_m::Pair<T>;
  constexpr int NU = num_u<C>(), L = window_per_lane<C>();
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int bm = a.b - 1, i = int(n0 >> a.log2b), n_loc = int(n0) & bm;
  // One row group: the odd k-tiles accumulate apart, so a chunk is 8 independent chains of C / 2 dependent
  // mma instead of 4 of C (each waits for the previous one's result, ~30 cycles); two row groups have 8.
  float odd[RG == 1 ? kNT : 1][4] = {};
  // the column of block (i, j) holding the chunk at input k, and the chunk's window: with E = n_loc - k_loc
  // - 16 (C - 1) - 8 (k_loc = k mod b), entry v holds (c[E - 6 + v], c[E - 7 + v]) (indices mod b)
  auto column = [&](int64_t k) { return a.w + (int64_t(i) * a.q + int(k >> a.log2b)) * a.b; };
  auto window_start = [&](int64_t k) { return n_loc - (int(k) & bm) - 16 * (C - 1) - 14; };
  for (int ch = c_lo; ch < c_hi; ch += W) {
    const int64_t k0 = int64_t(ch) * a.chunk;
    const float* c = column(k0);
    const int w0 = window_start(k0);
    if (ch + W < c_hi) {  // the warp's next chunk (window lines and x's slice) into L2 while this one waits
      const int64_t k1 = k0 + int64_t(W) * a.chunk;
      if (lane < L) prefetch_l2(column(k1) + ((window_start(k1) + 32 * lane) & bm));  // 32 floats a line
#pragma unroll
      for (int r = 0; r < RG; ++r) {  // lane (g, t): row g's 128-byte line t of the chunk (C = 16: all 4)
        const int64_t kt = k1 + 64 * t;
        if (64 * t < 16 * C && kt < a.K) prefetch_l2(a.x + min(m0 + 8 * r + g, a.M - 1) * a.K + kt);
      }
    }
    float lo[L], hi[L];
#pragma unroll
    for (int v = 0; v < L; ++v) {  // every load of the chunk in flight at once (x's below too)
      const int e = w0 + lane + 32 * v;
      lo[v] = __ldg(c + (e & bm));
      hi[v] = __ldg(c + ((e - 1) & bm));
    }
    uint32_t bx[RG][C][2];
    if (a.x_aligned4 && k0 + a.chunk <= a.K) {  // a whole chunk of word-aligned pairs (warp-uniform)
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        // a row past M reads row M - 1 instead: B's column g only feeds output column g, never stored
        const int64_t row = min(m0 + 8 * r + g, a.M - 1);
        const unsigned* xr = reinterpret_cast<const unsigned*>(a.x + row * a.K + k0 + 2 * t);
#pragma unroll
        for (int kk = 0; kk < C; ++kk) {
          bx[r][kk][0] = __ldg(xr + 8 * kk);
          bx[r][kk][1] = __ldg(xr + 8 * kk + 4);
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < RG; ++r)
#pragma unroll
        for (int kk = 0; kk < C; ++kk) {
          const int64_t row = m0 + 8 * r + g, k = k0 + 16 * kk + 2 * t;
          bx[r][kk][0] = x_pair(a, row, k);
          bx[r][kk][1] = x_pair(a, row, k + 8);
        }
    }
    __syncwarp();  // the previous chunk's reads of pw are done (its mma, warp-wide, already implies it)
#pragma unroll
    for (int v = 0; v < L; ++v) pw[lane + 32 * v] = P::pack2(lo[v], hi[v]);
    __syncwarp();
    uint32_t u[NU];  // u[s] = u(E + 8 s) for this lane: window entry 8 s + g - 2 t + 6
    const uint32_t* pl = pw + (g - 2 * t + 6);
#pragma unroll
    for (int s = 0; s < NU; ++s) u[s] = pl[8 * s];
    // tile (output tile ot, k-tile kk): D = n_loc - k_loc + 16 (ot - kk) = E + 8 sd
#pragma unroll
    for (int kk = 0; kk < C; ++kk)
#pragma unroll
      for (int ot = 0; ot < kNT; ++ot) {
        constexpr int base = 2 * (C - 1) + 1;
        const int sd = base + 2 * (ot - kk);
        const uint32_t af[4] = {u[sd], u[sd + 1], u[sd - 1], u[sd]};
#pragma unroll
        for (int r = 0; r < RG; ++r) P::mma(RG == 1 && kk % 2 ? odd[ot % (RG == 1 ? kNT : 1)] : acc[r][ot], af,
                                            bx[r][kk][0], bx[r][kk][1]);
      }
  }
  if constexpr (RG == 1) {
#pragma unroll
    for (int ot = 0; ot < kNT; ++ot)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[0][ot][v] += odd[ot][v];
  }
}

// The CTA's W warps share its 64 outputs and split its chunks (warp w: chunks c_lo + w, + W, ...); their
// sums meet in shared memory in warp order, then go to y (one split) or to the split's partials.
// W = kWarps, or the wide CTA (16 or 8 warps: launch()), whose sums reuse the pairs' shared memory once every
// warp is done with them (apart they would pass the 48 KB of static shared memory).
template <class T, int C, int RG, int W>
__global__ void __launch_bounds__(32 * W) cols_kernel(ColsArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 needs sm_80; the host never launches this below sm_80
#else
  constexpr int kRows = 8 * RG, kStride = kWarpOuts + 4;  // +4: the fragment stores hit 32 banks
  constexpr int kT = 32 * W, kPairWords = 32 * window_per_lane<C>(), kRedWords = W * kRows * kStride;
  constexpr bool kShare = W > kWarps;
  constexpr int kWords = kShare ? std::max(kRedWords, W * kPairWords) : kRedWords + W * kPairWords;
  __shared__ float smem[kWords];  // (4-byte words only: red and pairs alike)
  auto red = reinterpret_cast<float (*)[kRows][kStride]>(smem);  // [W][kRows][kStride]
  uint32_t* pairs = reinterpret_cast<uint32_t*>(smem + (kShare ? 0 : kRedWords));  // [W][kPairWords]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t n0 = int64_t(blockIdx.x) * kWarpOuts, m0 = int64_t(blockIdx.z) * kRows;
  const int split = blockIdx.y, c_lo = split * W * a.cpc, c_hi = min(a.chunks, c_lo + W * a.cpc);
  float acc[RG][kNT][4] = {};
  warp_tile<T, C, RG, W>(a, n0, m0, c_lo + warp, c_hi, pairs + warp * kPairWords, acc);
  if constexpr (kShare) __syncthreads();  // every warp done reading the pairs: the sums overwrite them
  // C fragment: acc[r][ot][v] is output n0 + 16 ot + g + 8 (v / 2), row m0 + 8 r + 2 t + v % 2
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int ot = 0; ot < kNT; ++ot)
#pragma unroll
      for (int v = 0; v < 4; ++v) red[warp][8 * r + 2 * t + (v & 1)][16 * ot + g + 8 * (v >> 1)] = acc[r][ot][v];
  __syncthreads();
  const int rows = int(min(int64_t(kRows), a.M - m0));
  auto finish = [&](int64_t col, float v) { return v + (a.bias != nullptr ? to_f32<T>(a.bias[col]) : 0.f); };
  for (int e = threadIdx.x; e < rows * kWarpOuts; e += kT) {
    const int rr = e / kWarpOuts, oc = e % kWarpOuts;
    const int64_t col = n0 + oc, row = m0 + rr;
    if (col >= a.N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) v += red[w][rr][oc];
    if (a.splits == 1) a.y[row * a.N + col] = from_f32<T>(finish(col, v));
    else a.part[(int64_t(split) * a.M + row) * a.N + col] = v;
  }
  if (a.splits == 1) return;
  if (!arrived_last(a.counters + int64_t(blockIdx.z) * gridDim.x + blockIdx.x, a.splits)) return;
  finish_split_tile<kT>(
      a.part, a.splits, a.M * a.N, rows * kWarpOuts,
      [&](int e) {
        const int64_t col = n0 + e % kWarpOuts;
        return col < a.N ? (m0 + e / kWarpOuts) * a.N + col : int64_t(-1);
      },
      [&](int e, float v) {
        const int64_t col = n0 + e % kWarpOuts;
        a.y[(m0 + e / kWarpOuts) * a.N + col] = from_f32<T>(finish(col, v));
      },
      &red[0][0][0]);  // (free again: arrived_last synchronized the CTA after the sums above)
#endif
}

// How many CTAs of cols_kernel<T, C, RG, W> fit on the GPU at once.
template <class T, int C, int RG, int W>
int64_t resident(int device) {
  return resident_ctas_of<cols_kernel<T, C, RG, W>>(device, 32 * W);
}

// Chunks per warp: as many warps as the GPU holds at once get work, each split's chunks are shared by the
// CTA's warps, and the last CTA of a tile reads at most ~32 partials a thread (splits x rows <= 32:
// its loads in one or two rounds of L2 latency; at M = 1 up to 32 splits). K is split only where the output
// tiles alone leave SMs without a CTA: the H200 (run 3, fp16, CUDA graph) ran 14336 x 4096 (224 tiles) at
// M = 1 in 9.3 us split in two against 7.9 unsplit, at M = 16 23.3 against 19.9 (b = 256, 512 and 4096 alike),
// but 4096^2 (64 tiles) in 5.8 split against 6.2 unsplit and 10.6 against 12.1: the fixup's L2 round trips
// and partial stores pay only where splitting puts idle SMs to work.
template <class T, int C, int RG, int W>
void plan(ColsArgs<T>& a, int64_t col_tiles, int64_t row_tiles, int device) {
  if constexpr (W > kWarps) {  // the wide CTA: K split inside the CTA only
    a.cpc = (a.chunks + W - 1) / W;
    a.splits = 1;
    return;
  }
  const int sms = sm_count(device);
  const int64_t warps = resident<T, C, RG, W>(device) * kWarps;
  // REPARAM_BC_COLS_SPLITS=n: at most n splits whatever the tile count (1: none; 32: the plan before the
  // tile rule; bench_structured times both as cuda_cols_1split / cuda_cols_split), read per call
  const char* cap = std::getenv("REPARAM_BC_COLS_SPLITS");
  const bool capped = cap != nullptr && cap[0] != '\0';
  const int64_t env_cap = capped ? std::max<long long>(1, std::atoll(cap)) : (col_tiles * row_tiles >= sms ? 1 : 32);
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(env_cap, 32 / std::min<int64_t>(a.M, 8 * RG)));
  int64_t cpc = std::max<int64_t>(1, (int64_t(a.chunks) * col_tiles * row_tiles + warps - 1) / warps);
  cpc = std::max<int64_t>(cpc, (a.chunks + kWarps * max_splits - 1) / (kWarps * max_splits));
  a.cpc = int(std::min<int64_t>(cpc, (a.chunks + kWarps - 1) / kWarps));
  a.splits = (a.chunks + kWarps * a.cpc - 1) / (kWarps * a.cpc);
}

// REPARAM_BC_COLS_WIDE=1 (read per call; off until the H200 has timed it: bench_structured's peer
// cuda_cols_wide): one wide CTA a tile, its chunks shared by 16 or 8 warps (K split inside the CTA only), the
// widest whose CTAs all fit the GPU at once, where the tile has more chunks than the narrow CTA's 4 warps. Why:
// run 3 had 4096^2, b = 256 (64 tiles) at M = 1 in 5.8 us split over 4 CTAs against 6.2 unsplit, and the
// unsplit 14336 x 4096 (224 tiles) faster than split (7.9 against 9.3): splitting over CTAs buys warps and pays
// a round of partial stores, arrival counters and the last CTA's L2 reads; the wide CTA has the split's warps
// (4096^2: 16, one chunk each at b >= 256) and sums them in shared memory, and where tiles fill the SMs (14336 x
// 4096 at M = 1: 224 CTAs of 8 warps, two an SM) halves each warp's chain of chunks without any fixup.
inline bool wide_enabled() { return env_opt_in("REPARAM_BC_COLS_WIDE"); }

template <class T, int C, int RG, int W>
void launch_tiles(ColsArgs<T> a, int64_t col_tiles, int64_t row_tiles, const Tensor& like, int device,
                  cudaStream_t stream) {
  plan<T, C, RG, W>(a, col_tiles, row_tiles, device);
  Tensor part = torch::stable::new_empty(like, {a.splits > 1 ? a.splits * a.M * a.N : 1}, ScalarType::Float);
  a.part = static_cast<float*>(part.data_ptr());
  if (a.splits > 1) {
    a.counters = split_k_counters(device, stream, col_tiles * row_tiles);
    STD_TORCH_CHECK(a.counters != nullptr, "reparam.block_circulant_cols_linear: could not set up the split-K "
                    "arrival counters (", col_tiles * row_tiles, " output tiles; at most ", kSplitCounterCapacity, ")");
  }
  const dim3 grid(unsigned(col_tiles), unsigned(a.splits), unsigned(row_tiles));
  cols_kernel<T, C, RG, W><<<grid, 32 * W, 0, stream>>>(a);
  RK_CUDA_CHECK(cudaGetLastError());
}

template <class T, int C, int RG>
void launch(const ColsArgs<T>& a, const Tensor& like, int device, cudaStream_t stream) {
  const int64_t col_tiles = (a.N + kWarpOuts - 1) / kWarpOuts, row_tiles = (a.M + 8 * RG - 1) / (8 * RG);
  STD_TORCH_CHECK(col_tiles < (int64_t(1) << 31) && row_tiles < 65536,
                  "reparam.block_circulant_cols_linear: too many rows or outputs for one launch");
  const int64_t tiles = col_tiles * row_tiles;
  // The wide CTA (16 warps with one row group: those kernels take <= 116 registers, under the 128 that 512
  // threads allow, ptxas sm_90a; 8 warps: up to 183), the widest whose CTAs all fit at once.
  if (wide_enabled() && a.chunks > kWarps) {
    if constexpr (RG == 1) {
      if (tiles <= resident<T, C, RG, 16>(device))
        return launch_tiles<T, C, RG, 16>(a, col_tiles, row_tiles, like, device, stream);
    }
    if (tiles <= resident<T, C, RG, 8>(device))
      return launch_tiles<T, C, RG, 8>(a, col_tiles, row_tiles, like, device, stream);
  }
  launch_tiles<T, C, RG, kWarps>(a, col_tiles, row_tiles, like, device, stream);
}

// Rows of x a CTA takes above M = 8: 16 (two row groups: the columns' fragments serve both) unless
// REPARAM_BC_COLS_TILE_ROWS=8 (read per call; bench_structured's peer cuda_cols_8rows). Why the switch: the
// H200 ran 4096², b = 256 at M = 16 in 10.6 us against 5.8 at M = 1 — 128 CTAs of 16 rows, one a SM, each
// warp two chunks of 128 mma in 8 chains of 16; 8-row tiles give twice the CTAs and half the chains' depth
// and x loads a warp (the columns' window is converted twice). Which wins is for the GPU to say.
inline int tile_rows() {
  const char* v = std::getenv("REPARAM_BC_COLS_TILE_ROWS");
  return v != nullptr && std::atoi(v) == 8 ? 8 : 16;
}

template <class T, int RG>
void launch_rows(const ColsArgs<T>& a, const Tensor& like, int device, cudaStream_t stream) {
  if (a.chunk == 64) launch<T, 4, RG>(a, like, device, stream);
  else if (a.chunk == 128) launch<T, 8, RG>(a, like, device, stream);
  else launch<T, 16, RG>(a, like, device, stream);
}

}  // namespace

Tensor block_circulant_cols_linear_cuda(Tensor x, Tensor w_cols, int64_t out_features, std::optional<Tensor> bias) {
  const char* op = "block_circulant_cols_linear";
  check_x(op, x);
  check_arg(op, "w_cols", w_cols, x, 3, ScalarType::Float);
  const int64_t p = w_cols.size(0), q = w_cols.size(1), b = w_cols.size(2);
  STD_TORCH_CHECK(b >= 64 && b <= 65536 && (b & (b - 1)) == 0,  // (no shared memory per block: any such size)
                  "reparam.block_circulant_cols_linear: the CUDA kernel takes blocks of a power of two in 64..65536 ",
                  "(`w_cols` [p, q, b]), got b = ", b, " (reparam_kernels.ops routes other sizes to the reference)");
  const int64_t K = x.size(x.dim() - 1), N = out_features;
  check_block_grid(op, "w_cols", p, q, b, K, N);
  check_bias(op, bias, x, N);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  const int64_t M = xc.numel() / K;
  Tensor y = torch::stable::new_empty(xc, out_shape(xc, N));
  if (M == 0) return y;
  cudaStream_t stream = current_stream(xc);
  const int device = xc.get_device_index();
  dispatch_half(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    ColsArgs<T> a{};
    a.x = static_cast<const T*>(xc.data_ptr());
    a.w = static_cast<const float*>(w_cols.data_ptr());
    a.bias = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    a.y = static_cast<T*>(y.data_ptr());
    a.M = M; a.K = K; a.N = N;
    a.q = int(q); a.b = int(b);
    while ((int64_t(1) << a.log2b) < b) ++a.log2b;
    a.chunk = int(std::min<int64_t>(b, kMaxChunk));
    a.chunks = int((K + a.chunk - 1) / a.chunk);
    a.x_aligned4 = reinterpret_cast<uintptr_t>(a.x) % 4 == 0 && K % 2 == 0;
    if (M <= 8 || tile_rows() == 8) launch_rows<T, 1>(a, xc, device, stream);
    else launch_rows<T, 2>(a, xc, device, stream);
  });
  return y;
}

}  // namespace reparam
