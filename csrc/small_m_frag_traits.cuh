// What a small-M format ("Frag", small_m_gemm.cuh) provides beyond the required members, detected at
// compile time: each trait names the optional member and what the loop does with it.
#pragma once

#include <type_traits>

namespace reparam {
namespace small_m {

// Formats with gather_x(m, k) / out_add(m, n) read x through a column map and add a per-output
// term (PivotFrag: the pivoted low-rank factor's first product).
template <class F, class = void>
struct gathers_x : std::false_type {};
template <class F>
struct gathers_x<F, std::void_t<decltype(&F::gather_x)>> : std::true_type {};
// ... and their Cols: a step pair's columns of x, read once for every row a lane gathers (gather_cols / gather).
template <class F, class = void>
struct x_cols_of {
  struct type {};
};
template <class F>
struct x_cols_of<F, std::void_t<typename F::Cols>> {
  using type = typename F::Cols;
};

// Formats whose A operand is a_consecutive of plain x (kPlainX; not gathered) take x word by word
// straight into the A registers instead of as 16-byte vectors.
template <class F, class = void>
struct loads_x_words : std::false_type {};
template <class F>
struct loads_x_words<F, std::void_t<decltype(F::kPlainX)>> : std::bool_constant<F::kPlainX && !gathers_x<F>::value> {};

// Formats with a RowState (and row_state(n), and b(chunk, state, i, h, b0, b1)) keep per-row data that
// is constant along K in registers, loaded once per work unit (LutFrag: the row's lookup table).
template <class F, class = void>
struct has_row_state : std::false_type {};
template <class F>
struct has_row_state<F, std::void_t<typename F::RowState>> : std::true_type {};
template <class F, class = void>
struct row_state_of {
  struct type {};
};
template <class F>
struct row_state_of<F, std::void_t<typename F::RowState>> {
  using type = typename F::RowState;
};

// Formats with side(row, kt) load a chunk's small per-chunk data apart from its 16 weight bytes
// (Int4Frag: the group's scale and zero point): the loop's shared-memory ring (kRingStages) copies the
// 16 bytes by cp.async and keeps only this in registers. Without side(), a chunk is its 16 bytes (Chunk::q).
template <class F, class = void>
struct has_side : std::false_type {};
template <class F>
struct has_side<F, std::void_t<decltype(&F::side)>> : std::true_type {};

// Formats with kTableBytes (and stage_tables(smem, col0), row_state(smem, col0, n)) keep lookup tables
// too large for registers in shared memory (VqPairFrag: a 256-entry codebook, one copy per lane so that
// the 32 lanes' lookups never share a bank): the kernel gets kTableBytes of dynamic shared memory, the
// CTA stages its column block's tables there before the loop, and the row state is the row's table.
// col0 and n are the format's rows (Problem::row_base added: a grouped launch's stack of experts).
template <class F, class = void>
struct has_smem_tables : std::false_type {};
template <class F>
struct has_smem_tables<F, std::void_t<decltype(F::kTableBytes)>> : std::true_type {};

// Formats with kPostScale (and ones(o), post(lo, hi, d, o, acc)) hand the mma raw codes and apply their
// scales after it, a stage at a time (Int4PostFrag): the loop sums the stage into its own accumulators,
// adds one mma of x against ones() for the sums post() needs, and lets post() fold the stage into acc.
// The transposed tile and the register loop only.
template <class F, class = void>
struct post_scales : std::false_type {};
template <class F>
struct post_scales<F, std::void_t<decltype(F::kPostScale)>> : std::bool_constant<F::kPostScale> {};

}  // namespace small_m
}  // namespace reparam
