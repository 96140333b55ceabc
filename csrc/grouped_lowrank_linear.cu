// grouped_lowrank_linear: a mixture-of-experts layer's low-rank experts in two launches with no host sync
// (the flat layout: reparam_kernels/ops/grouped_lowrank_linear.py). Expert e's rows of x [T, K] (rows
// expert_offsets[e] .. [e + 1], grouped_quant.cuh's Rows) go through
//   step 1  t = x . v[e]^T              (r_e columns; with perm: x's non-pivot columns gathered through perm[e],
//                                         its pivot columns added: W = u [I | w] P)
//   step 2  y = t . u[e]^T + bias[e]
// Each step runs small_m_gemm.cuh's register-fed mma.sync loop (HalfFrag / PivotFrag: the low-rank decode
// path's formats) on one expert's rows a CTA, as the grouped quantized ops do, except that every expert's shape
// is its own: each CTA reads its expert's rank and factor offsets on the device and sets its Problem's N, K
// and weight rows from them (a column block past the rank, a K split past the row length do nothing). The grid
// is cut for the widest expert (max_rank).
//
// t lives in global memory between the launches, in x's dtype (as the fused low-rank kernels round it): a row
// chunk starting at row r0 at r0 * ldt (ldt = max_rank rounded up to 8), its rows r_e elements apart, so that
// step 2's x rows are 16-byte aligned whenever r_e % 8 == 0.
//
// The small-M loop needs 16-byte weight rows: the layout's row_align promise of 8 (every rank and factor row a
// multiple of 8 elements), K % 8 == 0 and 16-byte aligned tensors. Otherwise (or REPARAM_GROUPED_SMALL_M=0) a
// warp-per-output fallback runs both steps (scalar loads, fp32 sums; correct for every layout, not fast).
// An expert whose factors would reach outside u or v (a bad layout, trusted on the GPU), or whose rank or
// offsets break the alignment the kernel needs, is skipped by both kernels: its rows come out as zeros, never
// a read out of bounds or a misaligned address. Pivots are kept inside [0, K).
#include "grouped_quant.cuh"
#include "ops.h"

namespace reparam {
namespace grouped_lowrank {

// The flat layout as the kernels read it.
template <class T>
struct Factors {
  const int64_t* fo;    // factor_offsets [2, E + 1]: cumulative ranks, then v segments' first elements
  const T* u;           // [N Σ r_e]
  const T* v;           // the v[e] (or w[e]) segments
  const int64_t* perm;  // [E, K], or nullptr (no expert pivoted)
  int64_t E, N, K, max_rank, u_numel, v_numel;
  int align;  // elements every rank, row length and factor start must be a multiple of (8: the small-M loop)
};

struct Expert {
  int64_t rank;   // r_e, clamped to [0, max_rank]
  int64_t u_off;  // u[e]'s first element
  int64_t v_off;  // v[e]'s first element
  int64_t k;      // v[e]'s row length: K, or with perm K minus the expert's pivots (K - r_e when pivoted)
  bool ok;        // inside u and v and aligned: else skipped
};

// Expert e's factors as the Triton kernel reads them (reparam_kernels/triton/grouped_lowrank_linear.py).
template <class T>
__device__ __forceinline__ Expert expert_factors(const Factors<T>& f, int64_t e) {
  const int64_t* ro = f.fo;
  const int64_t* vo = f.fo + f.E + 1;
  Expert x;
  x.rank = min(max(ro[e + 1] - ro[e], int64_t(0)), f.max_rank);
  x.v_off = vo[e];
  x.k = f.perm == nullptr ? f.K : min(max((vo[e + 1] - vo[e]) / max(x.rank, int64_t(1)), int64_t(0)), f.K);
  const int64_t u_rows = f.u_numel / f.N;  // u[e] is rows ro[e] .. ro[e] + r_e of u seen as [*, N]
  x.ok = ro[e] >= 0 && ro[e] <= u_rows - x.rank && x.v_off >= 0 && x.v_off <= f.v_numel - x.rank * x.k &&
         x.rank % f.align == 0 && x.k % f.align == 0 && x.v_off % f.align == 0 && (ro[e] * f.N) % f.align == 0;
  x.u_off = x.ok ? ro[e] * f.N : 0;
  return x;
}

// PivotFrag for one expert of the group: its pivot count `r` is K minus its row length, 0 for a plain expert
// among pivoted ones (perm is then the identity), so only the first r outputs add a pivot column.
template <class T>
struct ExpertPivotFrag : small_m::PivotFrag<T> {
  __device__ __forceinline__ float out_add(int m, int64_t n) const {
    return n < this->r ? small_m::PivotFrag<T>::out_add(m, n) : 0.f;
  }
};

// Step 1 (kSecond false: p.x is x, p.y is t) or step 2 (p.x is t, p.y is y) of one (expert, row chunk) and
// column block / K split; the grid as grouped_quant.cuh's small_m_grouped_kernel, cut for the widest expert.
template <class Frag, class T, int MT, int NG, bool kSecond>
__global__ void __launch_bounds__(small_m::kThreads, (small_m::ctas_per_sm<Frag, MT>()))
    grouped_lowrank_kernel(small_m::Problem<Frag, T> p, grouped::Rows rows, Factors<T> f, int64_t ldt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 needs sm_80; the host never launches this below sm_80
#else
  const int e = int(blockIdx.z) / rows.slots;
  const unsigned columns = unsigned(p.columns), layer = blockIdx.x / columns;
  const int64_t c = int(blockIdx.z) % rows.slots + int64_t(rows.slots) * layer, bx = blockIdx.x - layer * columns;
  int64_t lo, hi;
  grouped::expert_rows(rows, e, lo, hi);
  const int64_t r0 = lo + c * grouped::rows_per_tile<MT>();
  if (r0 >= hi) return;  // (every exit: the whole CTA, before run_unit's first barrier)
  const Expert ex = expert_factors(f, e);
  if (!ex.ok) return;
  p.M = int(min(hi - r0, int64_t(grouped::rows_per_tile<MT>())));
  const int64_t t_rows = r0 * ldt;  // this chunk's rows of t (r_e elements each: ldt is enough room)
  if constexpr (!kSecond) {
    if (bx * (small_m::kWarpsN * 8 * NG) >= ex.rank) return;  // past this expert's rank (none at rank 0)
    p.N = ex.rank;
    p.K = ex.k;
    p.frag.w = f.v + ex.v_off;
    p.frag.K = ex.k;
    if constexpr (small_m::gathers_x<Frag>::value) {
      p.frag.xin = p.x + r0 * f.K;
      p.frag.perm = f.perm + e * f.K;
      p.frag.r = f.K - ex.k;
    }
    p.x += r0 * f.K;
    p.y += t_rows;
    if (p.splits > 1) p.part += r0 * ldt * p.splits;  // (this chunk's [splits, M, r_e] inside its rows' share)
  } else {
    p.K = ex.rank;
    p.frag.w = f.u + ex.u_off;
    p.frag.K = ex.rank;
    p.x += t_rows;
    p.y += r0 * p.N;
    if (p.bias != nullptr) p.bias += int64_t(e) * p.N;
    if (p.splits > 1) p.part += r0 * p.N * p.splits;
  }
  if (p.splits > 1) p.counters += (int64_t(e) * rows.chunks + c) * p.columns;
  small_m::run_unit<Frag, T, MT, NG, true, true>(p, bx, blockIdx.y);
#endif
}

// One step on tile MT; false where the grid cannot hold it (the caller falls back).
template <class Frag, class T, int MT, bool kSecond>
bool launch_step(small_m::Problem<Frag, T> p, const grouped::Rows& rows, const grouped::ChunkPlan& c,
                 const Factors<T>& f, int64_t ldt, int64_t part_rows, const Tensor& like, cudaStream_t stream) {
  constexpr int NG = small_m::groups_for<MT>();
  constexpr auto grouped_lowrank = grouped_lowrank_kernel<Frag, T, MT, NG, kSecond>;  // (the name the CPU harness traces)
  Tensor part = grouped::plan_split<NG>(p, c, f.E, part_rows, small_m::resident_ctas<grouped_lowrank>(like.get_device_index()),
                                        like, stream);
  if (p.columns * c.layers >= (int64_t(1) << 31)) return false;
  const dim3 grid(unsigned(p.columns * c.layers), unsigned(p.splits), unsigned(f.E * c.slots));
  grouped_lowrank<<<grid, small_m::kThreads, 0, stream>>>(p, rows, f, ldt);
  RK_CUDA_CHECK(cudaGetLastError());
  return true;
}

// Both steps on the small-M loop with tile MT (Frag1: HalfFrag, or ExpertPivotFrag with perm).
template <class Frag1, class T, int MT>
bool launch_small_m(const Frag1& frag1, const Factors<T>& f, const T* x, const int64_t* offsets, const T* bias, T* y,
                    int64_t T_, const Tensor& like, cudaStream_t stream) {
  const grouped::ChunkPlan c = grouped::chunk_plan<MT>(T_, f.E);
  if (!c.ok) return false;
  const grouped::Rows rows{offsets, T_, int(c.chunks), int(c.slots)};
  const int64_t ldt = (f.max_rank + 7) / 8 * 8;
  Tensor t = torch::stable::new_empty(like, {T_ * ldt});
  T* tp = static_cast<T*>(t.data_ptr());
  const int kCap = grouped::rows_per_tile<MT>();
  // N and K of the widest expert: the grid's columns and K splits
  const small_m::Problem<Frag1, T> p1{frag1, x, nullptr, tp, nullptr, nullptr, kCap, f.max_rank, f.K, 0, 0, 0};
  const small_m::Problem<small_m::HalfFrag<T>, T> p2{{{f.u, 0}}, tp, bias, y, nullptr, nullptr, kCap, f.N, f.max_rank,
                                                     0, 0, 0};
  return launch_step<Frag1, T, MT, false>(p1, rows, c, f, ldt, T_ * ldt, like, stream) &&
         launch_step<small_m::HalfFrag<T>, T, MT, true>(p2, rows, c, f, ldt, T_ * f.N, like, stream);
}

constexpr int kDecWarps = grouped::kDecWarps;

// Fallback step 1: t[row, j] (t [T, ldt]; j < r_e, a warp an output) for every row of an expert.
template <class T>
__global__ void __launch_bounds__(kDecWarps * 32)
    grouped_lowrank_dec_t(Factors<T> f, const T* __restrict__ x, grouped::Rows rows, T* __restrict__ t, int64_t ldt) {
  const int64_t row = blockIdx.x, j = int64_t(blockIdx.y) * kDecWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t e = grouped::expert_of(rows, f.E, row);
  if (e < 0) return;
  const Expert ex = expert_factors(f, e);
  if (!ex.ok || j >= ex.rank) return;
  const T* xr = x + row * f.K;
  const T* vr = f.v + ex.v_off + j * ex.k;
  const int64_t pivots = f.K - ex.k;  // (0 without perm)
  const int64_t* pe = f.perm == nullptr ? nullptr : f.perm + e * f.K;
  float acc = 0.f;
  for (int64_t k = lane; k < ex.k; k += 32)
    acc += to_f32<T>(vr[k]) * to_f32<T>(xr[pe == nullptr ? k : small_m::col_inside(pe[pivots + k], f.K)]);
#pragma unroll
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    if (j < pivots) acc += to_f32<T>(xr[small_m::col_inside(pe[j], f.K)]);
    t[row * ldt + j] = from_f32<T>(acc);
  }
}

// Fallback step 2: y[row, n] = t[row, :r_e] . u[e][n] + bias[e, n], zero for rows of no expert or a skipped one.
template <class T>
__global__ void __launch_bounds__(kDecWarps * 32)
    grouped_lowrank_dec_y(Factors<T> f, const T* __restrict__ t, grouped::Rows rows, int64_t ldt,
                          const T* __restrict__ bias, T* __restrict__ y) {
  const int64_t row = blockIdx.x, n = int64_t(blockIdx.y) * kDecWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= f.N) return;
  const int64_t e = grouped::expert_of(rows, f.E, row);
  const Expert ex = e >= 0 ? expert_factors(f, e) : Expert{0, 0, 0, 0, false};
  float acc = 0.f;
  if (ex.ok) {
    const T* ur = f.u + ex.u_off + n * ex.rank;
    for (int64_t j = lane; j < ex.rank; j += 32) acc += to_f32<T>(ur[j]) * to_f32<T>(t[row * ldt + j]);
  }
#pragma unroll
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) y[row * f.N + n] = from_f32<T>(ex.ok ? acc + (bias ? to_f32<T>(bias[e * f.N + n]) : 0.f) : 0.f);
}

template <class T>
void launch_dec(const Factors<T>& f, const T* x, const int64_t* offsets, const T* bias, T* y, int64_t T_,
                const Tensor& like, cudaStream_t stream) {
  const int64_t ldt = f.max_rank, cols_t = (ldt + kDecWarps - 1) / kDecWarps, cols_y = (f.N + kDecWarps - 1) / kDecWarps;
  STD_TORCH_CHECK(T_ < (int64_t(1) << 31) && cols_t < 65536 && cols_y < 65536,
                  "reparam: grouped_lowrank_linear too large for its fallback kernel");
  Tensor t = torch::stable::new_empty(like, {T_ * ldt});
  T* tp = static_cast<T*>(t.data_ptr());
  const grouped::Rows rows{offsets, T_, 1, 1};
  grouped_lowrank_dec_t<T><<<dim3(unsigned(T_), unsigned(cols_t)), kDecWarps * 32, 0, stream>>>(f, x, rows, tp, ldt);
  RK_CUDA_CHECK(cudaGetLastError());
  grouped_lowrank_dec_y<T><<<dim3(unsigned(T_), unsigned(cols_y)), kDecWarps * 32, 0, stream>>>(f, tp, rows, ldt, bias, y);
  RK_CUDA_CHECK(cudaGetLastError());
}

// Both steps: the small-M loop where the layout and the GPU take it, else the fallback.
template <class T>
void linear(Factors<T> f, int64_t row_align, const Tensor& xc, const Tensor& expert_offsets,
            const std::optional<Tensor>& bias_t, Tensor& y_t, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xc.data_ptr());
  const int64_t* offsets = static_cast<const int64_t*>(expert_offsets.data_ptr());
  const T* bias = bias_t.has_value() ? static_cast<const T*>(bias_t->data_ptr()) : nullptr;
  T* y = static_cast<T*>(y_t.data_ptr());
  const int64_t T_ = xc.size(0);
  const bool fits = row_align == 8 && f.K % 8 == 0 && grouped::small_m_enabled() &&
                    small_m::compute_major(xc.get_device_index()) >= 8 && f.K < small_m::kMaxK &&
                    small_m::rows_fit32(f.max_rank, f.K) && small_m::rows_fit32(f.N, f.max_rank) && aligned16(x) &&
                    aligned16(f.u) && aligned16(f.v);
  if (fits) {
    // the loop writes only its experts' rows (the fallback's step 2 writes them all)
    RK_CUDA_CHECK(cudaMemsetAsync(y, 0, size_t(T_ * f.N) * sizeof(T), stream));
    Factors<T> f8 = f;
    f8.align = 8;
    const bool done = small_m::for_tile_shape(std::min<int64_t>(T_, small_m::kMaxM), [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      if (f.perm != nullptr)
        return launch_small_m<ExpertPivotFrag<T>, T, MT>(ExpertPivotFrag<T>{{{{f.v, 0}}, x, f.perm, f.K, 0}}, f8, x,
                                                          offsets, bias, y, T_, xc, stream);
      return launch_small_m<small_m::HalfFrag<T>, T, MT>(small_m::HalfFrag<T>{{f.v, 0}}, f8, x, offsets, bias, y, T_,
                                                         xc, stream);
    });
    if (done) return;
  }
  launch_dec(f, x, offsets, bias, y, T_, xc, stream);
}

}  // namespace grouped_lowrank

Tensor grouped_lowrank_linear_cuda(Tensor x, Tensor expert_offsets, Tensor u, Tensor v, std::optional<Tensor> perm,
                                   Tensor factor_offsets, int64_t out_features, int64_t max_rank, int64_t row_align,
                                   std::optional<Tensor> bias) {
  const char* op = "grouped_lowrank_linear";
  check_x(op, x);
  check_arg(op, "factor_offsets", factor_offsets, x, 2, ScalarType::Long);
  STD_TORCH_CHECK(factor_offsets.size(0) == 2 && factor_offsets.size(1) >= 2,
                  "reparam.grouped_lowrank_linear: `factor_offsets` must be [2, E + 1] with E >= 1");
  const int64_t E = factor_offsets.size(1) - 1;
  STD_TORCH_CHECK(out_features > 0 && max_rank > 0,
                  "reparam.grouped_lowrank_linear: `out_features` and `max_rank` must be positive");
  STD_TORCH_CHECK(row_align == 1 || row_align == 2 || row_align == 4 || row_align == 8,
                  "reparam.grouped_lowrank_linear: `row_align` must be 1, 2, 4 or 8");
  if (perm.has_value()) {
    check_arg(op, "perm", *perm, x, 2, ScalarType::Long);
    STD_TORCH_CHECK(perm->size(0) == E, "reparam.grouped_lowrank_linear: `perm` must be [E, K]");
  }
  const int64_t K = perm.has_value() ? perm->size(1) : (x.dim() == 2 ? x.size(1) : 0);
  grouped::check_rows(op, x, expert_offsets, E, out_features, K, bias);
  check_arg(op, "u", u, x, 1, x.scalar_type());
  check_arg(op, "v", v, x, 1, x.scalar_type());
  return grouped::with_output(op, x, out_features, [&](auto tag, const Tensor& xc, Tensor& y, cudaStream_t stream) {
    using T = decltype(tag);
    const grouped_lowrank::Factors<T> f{static_cast<const int64_t*>(factor_offsets.data_ptr()),
                                        static_cast<const T*>(u.data_ptr()),
                                        static_cast<const T*>(v.data_ptr()),
                                        perm.has_value() ? static_cast<const int64_t*>(perm->data_ptr()) : nullptr,
                                        E, out_features, K, max_rank, u.numel(), v.numel(), 1};
    grouped_lowrank::linear<T>(f, row_align, xc, expert_offsets, bias, y, stream);
  });
}

}  // namespace reparam
