// What the grouped quantized ops (grouped_{int4,int8,vq,lut}_linear.cu) share: a
// mixture-of-experts layer's experts in one launch, with the rows of each expert found on the device (no host sync,
// so the call is capturable in a CUDA graph).
//
// x [T, K] holds the routed rows sorted by expert: rows offsets[e] .. offsets[e + 1] (clamped to [0, T]) go
// through expert e; rows in no expert's range come out as zeros (reparam_kernels/ops/_grouped.py). The
// experts' weights are one stack, so the format's row e N + n is expert e's row n: a Frag / Dec built for
// the [E N, K] stack serves every expert.
//
// Two kernels:
// * small_m_grouped_kernel: small_m_gemm.cuh's run_unit (the register-fed mma.sync loop timed on the H200
//   for int4_linear / int8_linear at M <= 64) on one expert's rows. Grid (columns x layers, splits, E x slots):
//   CTA z takes expert z / slots and its rows chunk z % slots + slots (x / columns) of kCap rows (the tile's
//   rows; slots = chunks unless E x chunks passes the grid's 65535: then the rest ride on x, past the
//   columns). The host knows only T, so the tile is chosen by T (at decode an expert has at most T = tokens x
//   top_k rows) and chunks = ceil(T / kCap) covers an expert that takes all of them; a CTA past its expert's
//   rows returns before reading anything (at one token, E - top_k experts' CTAs). K is split for the (expert, chunk) pairs that can have rows; each pair has its own
//   split-K counters and its own fp32 partials. A format with shared-memory tables (VqPairFrag's codebooks)
//   has each CTA stage its column block's tables of its expert (run_unit finds them by the stack's rows).
// * grouped_dec_kernel: the fallback where the loop's layout requirements fail (K not a multiple of the
//   format's lane block, a power-of-two group for int4, 16-byte aligned x and weights, 32-bit row offsets)
//   or REPARAM_GROUPED_SMALL_M=0: a warp per output, the format's general decoder (quant_gemm.cuh's Dec).
//   Correct for every layout, not fast.
#pragma once

#include "quant_gemm.cuh"
#include "small_m_launch.cuh"

namespace reparam {
namespace grouped {

// Where each expert's rows are (device memory) and how the kernel's z index splits into expert x chunk slot.
struct Rows {
  const int64_t* offsets;  // [E + 1]
  int64_t T;               // rows of x
  int chunks;              // row chunks per expert (an expert holding all T rows needs them all)
  int slots;               // chunks an expert along z (grid z <= 65535); the rest along x, past the columns
};

// Expert e's rows [lo, hi) as the reference reads them (reference/_grouped.py: clamped; none when hi <= lo).
__device__ __forceinline__ void expert_rows(const Rows& r, int e, int64_t& lo, int64_t& hi) {
  lo = max(r.offsets[e], int64_t(0));
  hi = min(r.offsets[e + 1], r.T);
}

constexpr int64_t kMaxGridZ = 65535;  // grid z (a test shrinks it to put chunks on x)

// The expert whose range holds row t (the last such, as the reference's loop writes), or -1.
__device__ __forceinline__ int64_t expert_of(const Rows& r, int64_t E, int64_t t) {
  int64_t e = -1;
  for (int64_t i = 0; i < E; ++i) {
    int64_t lo, hi;
    expert_rows(r, int(i), lo, hi);
    if (lo <= t && t < hi) e = i;
  }
  return e;
}

template <int MT>
constexpr int rows_per_tile() {
  return MT == 0 ? 8 : 16 * MT;
}

// How a launch of kCap-row tiles covers T rows of E experts (the host knows only T): `chunks` an expert, `slots`
// of them along z (E slots <= kMaxGridZ), the rest in `layers` along x; `busy` (expert, chunk) pairs can hold
// rows (every chunk but each expert's last is full). ok: false where the grid cannot hold it.
struct ChunkPlan {
  int64_t chunks, slots, layers, busy;
  bool ok;
};
template <int MT>
ChunkPlan chunk_plan(int64_t T_, int64_t E) {
  constexpr int kCap = rows_per_tile<MT>();
  ChunkPlan c;
  c.chunks = (T_ + kCap - 1) / kCap;
  c.slots = std::min<int64_t>(c.chunks, kMaxGridZ / E);
  c.ok = c.slots >= 1 && c.chunks < (int64_t(1) << 31);
  c.layers = c.ok ? (c.chunks + c.slots - 1) / c.slots : 0;
  c.busy = std::max<int64_t>(1, std::min(E * c.slots, T_ / kCap + std::min(E, T_)));
  return c;
}

template <class Frag, class T, int MT, int NG>
__global__ void __launch_bounds__(small_m::kThreads, (small_m::ctas_per_sm<Frag, MT>()))
    small_m_grouped_kernel(small_m::Problem<Frag, T> p, Rows rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 needs sm_80; the host never launches this below sm_80
#else
  // (no loop over chunks in a CTA: around run_unit it cost the M <= 16 loop 26 instructions a stage and put
  // waits on the next stage's loads into it; the layers on y, past the K splits, cost it 16: sm_90a SASS)
  const int e = int(blockIdx.z) / rows.slots;
  const unsigned columns = unsigned(p.columns), layer = blockIdx.x / columns;
  const int64_t c = int(blockIdx.z) % rows.slots + int64_t(rows.slots) * layer;
  int64_t lo, hi;
  expert_rows(rows, e, lo, hi);
  const int64_t r0 = lo + c * rows_per_tile<MT>();
  if (r0 >= hi) return;  // the whole CTA: before run_unit's first barrier
  p.M = int(min(hi - r0, int64_t(rows_per_tile<MT>())));
  p.x += r0 * p.K;
  p.y += r0 * p.N;
  if (p.bias != nullptr) p.bias += int64_t(e) * p.N;
  p.row_base = uint32_t(e) * uint32_t(p.N);
  if (p.splits > 1) {  // this chunk's partials [splits, M, N] and counters [columns]
    p.part += r0 * p.N * p.splits;
    p.counters += (int64_t(e) * rows.chunks + c) * p.columns;
  }
  if constexpr (small_m::has_smem_tables<Frag>::value) {  // Frag::kTableBytes of dynamic shared memory
    extern __shared__ __align__(16) uint4 grouped_tables[];
    small_m::run_unit<Frag, T, MT, NG, true, true>(p, blockIdx.x - layer * columns, blockIdx.y, nullptr,
                                                   reinterpret_cast<uint32_t*>(grouped_tables));
  } else {
    small_m::run_unit<Frag, T, MT, NG, true, true>(p, blockIdx.x - layer * columns, blockIdx.y);
  }
#endif
}

// Cuts p (its N and K those of the widest expert) into columns x splits so that the busy (expert, chunk) pairs
// fill the `resident` CTAs, with split-K counters for every (expert, chunk, column) (none: no split) and the fp32
// partials, `rows` (T x the widest N) a split. Keep the returned tensor until the launch is enqueued.
template <int NG, class Frag, class T>
Tensor plan_split(small_m::Problem<Frag, T>& p, const ChunkPlan& c, int64_t E, int64_t rows, int64_t resident,
                  const Tensor& like, cudaStream_t stream) {
  small_m::plan<NG>(p, std::max<int64_t>(1, resident / c.busy));
  if (p.splits > 1) {
    p.counters = split_k_counters(like.get_device_index(), stream, E * c.chunks * p.columns);
    if (p.counters == nullptr) small_m::plan<NG>(p, 0);  // more counters than the buffer: no split
  }
  Tensor part = torch::stable::new_empty(like, {p.splits > 1 ? p.splits * rows : 1}, ScalarType::Float);
  p.part = static_cast<float*>(part.data_ptr());
  return part;
}

// Launches the small-M grouped kernel with tile MT; false where it cannot (the caller falls back).
template <class Frag, class T, int MT, int NG>
bool launch_small_m(const Frag& frag, const T* x, const int64_t* offsets, int64_t E, const T* bias, T* y, int64_t T_,
                    int64_t N, int64_t K, const Tensor& like, cudaStream_t stream) {
  constexpr auto small_m_grouped = small_m_grouped_kernel<Frag, T, MT, NG>;  // (the name the CPU harness traces)
  const ChunkPlan c = chunk_plan<MT>(T_, E);
  if (!c.ok) return false;
  const int device = like.get_device_index();
  const int smem = small_m::table_smem<small_m_grouped, Frag>(device);  // (VqPairFrag's codebooks, staged by each CTA)
  if (smem < 0) return false;
  small_m::Problem<Frag, T> p{frag, x, bias, y, nullptr, nullptr, rows_per_tile<MT>(), N, K, 0, 0, 0};
  Tensor part = plan_split<NG>(p, c, E, T_ * N, small_m::resident_ctas<small_m_grouped>(device, smem), like, stream);
  if (p.columns * c.layers >= (int64_t(1) << 31)) return false;
  small_m_grouped<<<dim3(unsigned(p.columns * c.layers), unsigned(p.splits), unsigned(E * c.slots)), small_m::kThreads, smem, stream>>>(
      p, Rows{offsets, T_, int(c.chunks), int(c.slots)});
  RK_CUDA_CHECK(cudaGetLastError());
  return true;
}

constexpr int kDecWarps = 8;

// y[t, n] for every row t (blockIdx.x) and kDecWarps outputs n a CTA (one a warp): the dot product of x[t]
// with the decoded row e N + n of its expert e (zero where t is in no expert's range; the last expert whose
// range holds t, as the reference's loop writes). `dec` decodes the [E N, K] stack.
template <class Dec, class T>
__global__ void __launch_bounds__(kDecWarps * 32)
    grouped_dec_kernel(Dec dec, const T* __restrict__ x, Rows rows, int64_t E, const T* __restrict__ bias,
                       T* __restrict__ y, int64_t N, int64_t K) {
  const int64_t t = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * kDecWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int64_t e = expert_of(rows, E, t);
  float acc = 0.f;
  if (e >= 0) {
    const int64_t row = e * N + n;
    const T* xr = x + t * K;
    for (int64_t k0 = int64_t(lane) * Dec::KC; k0 < K; k0 += 32 * Dec::KC) {
      const uint4 raw = dec.load(row, k0);
      const typename Dec::Params prm = dec.params(row, k0);
#pragma unroll
      for (int j = 0; j < Dec::KC / 8; ++j) {
        float w[8];
        dec.decode8(raw, prm, j, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t k = k0 + 8 * j + i;
          if (k < K) acc += w[i] * to_f32<T>(xr[k]);  // (codes past K decode to nonzero weights)
        }
      }
    }
  }
#pragma unroll
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) y[t * N + n] = from_f32<T>(e >= 0 ? acc + (bias ? to_f32<T>(bias[e * N + n]) : 0.f) : 0.f);
}

template <class Dec, class T>
void launch_dec(const Dec& dec, const T* x, const int64_t* offsets, int64_t E, const T* bias, T* y, int64_t T_,
                int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t cols = (N + kDecWarps - 1) / kDecWarps;
  STD_TORCH_CHECK(T_ < (int64_t(1) << 31) && cols < 65536, "reparam: grouped op too large for its fallback kernel");
  grouped_dec_kernel<Dec, T><<<dim3(unsigned(T_), unsigned(cols)), kDecWarps * 32, 0, stream>>>(
      dec, x, Rows{offsets, T_, 1, 1}, E, bias, y, N, K);
  RK_CUDA_CHECK(cudaGetLastError());
}

// The checks every grouped op makes besides its format's and check_x (which each op makes first): x [T, K] (the
// weights' K), expert_offsets int64 [E + 1], bias [E, N]; all on x's device.
inline void check_rows(const char* op, const Tensor& x, const Tensor& expert_offsets, int64_t E, int64_t N, int64_t K,
                       const std::optional<Tensor>& bias) {
  STD_TORCH_CHECK(x.dim() == 2, "reparam.", op, ": `x` must be 2-D [rows, in_features]");
  STD_TORCH_CHECK(K > 0, "reparam.", op, ": in_features K must be positive");
  STD_TORCH_CHECK(x.size(1) == K, "reparam.", op, ": `x` last dimension must equal the experts' in_features ", K);
  check_arg(op, "expert_offsets", expert_offsets, x, 1, ScalarType::Long);
  STD_TORCH_CHECK(expert_offsets.size(0) == E + 1, "reparam.", op, ": `expert_offsets` must have E + 1 entries");
  if (bias.has_value()) {
    check_arg(op, "bias", *bias, x, 2, x.scalar_type());
    STD_TORCH_CHECK(bias->size(0) == E && bias->size(1) == N, "reparam.", op, ": `bias` must be [E, N]");
  }
}

// y [T, N] for x [T, K]: run(tag, x, y, stream) with tag a value of x's dtype (fp16 / bf16) on x's device and
// stream, unless y is empty.
template <class F>
Tensor with_output(const char* op, const Tensor& x, int64_t N, F&& run) {
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  Tensor y = torch::stable::new_empty(xc, {xc.size(0), N});
  if (xc.size(0) == 0 || N == 0) return y;
  cudaStream_t stream = current_stream(xc);
  dispatch_half(xc.scalar_type(), op, [&](auto tag) { run(tag, xc, y, stream); });
  return y;
}

// REPARAM_GROUPED_SMALL_M=0: every grouped call takes the fallback kernel (A/B runs, bisecting).
inline bool small_m_enabled() { return env_switch_on("REPARAM_GROUPED_SMALL_M"); }

// y [T, N] = each expert's rows of x [T, K] (contiguous, of dtype T) through its weights: the small-M kernel where
// `frag_ok` (the format's layout fits it: lane-block K, aligned rows, 32-bit offsets of the stack) and the GPU
// takes it, else the fallback. Rows in no expert's range are zeroed first (the small-M kernel writes only its
// experts' rows).
template <class T, class Frag, class Dec>
void linear(const Frag& frag, bool frag_ok, const Dec& dec, const Tensor& xc, const Tensor& expert_offsets, int64_t E,
            const std::optional<Tensor>& bias_t, Tensor& y_t, int64_t N, int64_t K, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xc.data_ptr());
  const int64_t* offsets = static_cast<const int64_t*>(expert_offsets.data_ptr());
  const T* bias = bias_t.has_value() ? static_cast<const T*>(bias_t->data_ptr()) : nullptr;
  T* y = static_cast<T*>(y_t.data_ptr());
  const int64_t T_ = xc.size(0);
  const Tensor& like = xc;
  const bool fits = frag_ok && small_m_enabled() && small_m::compute_major(like.get_device_index()) >= 8 &&
                    K % Frag::kLaneK == 0 && K < small_m::kMaxK && small_m::rows_fit32(E * N, K) && aligned16(x);
  if (fits) {
    RK_CUDA_CHECK(cudaMemsetAsync(y, 0, size_t(T_ * N) * sizeof(T), stream));
    const bool done = small_m::for_tile_shape(std::min<int64_t>(T_, small_m::kMaxM), [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      return launch_small_m<Frag, T, MT, small_m::groups_for<MT>()>(frag, x, offsets, E, bias, y, T_, N, K, like, stream);
    });
    if (done) return;
  }
  launch_dec(dec, x, offsets, E, bias, y, T_, N, K, stream);
}

}  // namespace grouped
}  // namespace reparam
