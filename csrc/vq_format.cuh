// The vector-quantized format's two decoders (layout: vq_linear.cu): VqDec for the general paths
// (quant_gemm.cuh, any d) and VqPairFrag for the small-M tensor-core loop (small_m_gemm.cuh, d = 2), and
// the check that a column block's codebooks fit VqPairFrag's shared-memory slots; shared by vq_linear.cu
// and grouped_vq_linear.cu.
#pragma once

#include "quant_gemm.cuh"
#include "small_m_launch.cuh"

namespace reparam {

// Any d: a chunk is 16 weights k0 .. k0 + 15 (k0 % 16 == 0), whose codes are the bytes from k0 / d on
// (at most 16 of them: d = 1; for d >= 2 at most 8, one 8-byte load when d = 2 and rows are aligned).
template <class T>
struct VqDec {
  static constexpr int KC = 16;
  const uint8_t* codes;
  const T* books;
  int64_t K, rows_per_book, book_stride;  // book_stride = E * d
  int d;
  bool vec;  // code rows aligned for the wide loads: 16 bytes (d == 1) or 8 (d == 2)

  __device__ __forceinline__ uint4 load(int64_t n, int64_t k0) const {
    const int64_t len = K / d, c0 = k0 / d;
    const uint8_t* row = codes + n * len;
    if (vec && d == 1) return quant::load_row_bytes(row, c0, len, true);
    if (vec && d == 2 && c0 + 8 <= len) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + c0));
      return make_uint4(v.x, v.y, 0u, 0u);
    }
    return quant::load_row_bytes(row, c0, len, false);
  }
  struct Params {
    const T* book;
    int r0;  // k0 % d: where k0 falls inside its sub-vector
  };
  __device__ __forceinline__ Params params(int64_t n, int64_t k0) const {
    return {books + (n / rows_per_book) * book_stride, int(k0 % d)};
  }
  // Weights k0 + 8j .. + 7: weight k0 + o is coordinate (r0 + o) % d of code byte (r0 + o) / d.
  __device__ __forceinline__ void decode8(const uint4& raw, const Params& p, int j, float* w) const {
    const int s = p.r0 + 8 * j;
    int q = s / d, r = s - q * d;  // one division per 8 weights, then a running (byte, coordinate)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t code = (small_m::word(raw, q >> 2) >> (8 * (q & 3))) & 0xFFu;
      w[e] = to_f32<T>(__ldg(p.book + code * uint32_t(d) + r));
      const bool wrap = ++r == d;
      r = wrap ? 0 : r;
      q += wrap;
    }
  }
};

// Pairs on the small-M path. A lane's 16-byte load is 16 codes = 32 consecutive k of one row: word i
// holds the codes of k = kt + 8i .. +7, byte b the pair (kt + 8i + 2b, +1). Step h's B registers are
// the entries of bytes 2h (k, k + 1) and 2h + 1 (k + 2, k + 3): the consecutive slot map of int8 and
// lut, so x is a_consecutive. An entry is one 32-bit word (half2 / bfloat162, coordinate 0 in the
// low half, the mma's lower k). A 256-entry codebook is 1 KB: 32 lanes picking random entries would
// collide on banks (3.2-way on average, simulated), so shared memory holds 32 copies interleaved word
// by word, entry e of lane l at word 32 e + l: every lane reads its own bank. A column block (BN <= 128
// rows) reads at most kSlots codebooks (the host checks it: books_fit_slots), 64 KB. Per code: one
// PRMT, one IMAD (code x 128 onto the lane's address), one LDS.
template <class T>
struct VqPairFrag {
  static constexpr int kLaneK = 32;
  static constexpr bool kPlainX = true;
  static constexpr int kSlots = 2, kEntries = 256;
  static constexpr int kTableBytes = kSlots * kEntries * 32 * 4;
  const uint8_t* codes;  // [N, K / 2]
  const T* books;        // [L, E, 2]
  int64_t K, rows_per_book, L, E;

  struct Chunk {
    uint4 q;
  };
  struct Row {
    uint32_t off;  // n * K / 2 (rows_fit32, checked by the host)
  };
  struct RowState {
    smem_addr tab;  // the row's codebook copies, offset to this lane's
  };
  __device__ __forceinline__ Row row(int64_t n) const { return {uint32_t(n) * uint32_t(K / 2)}; }
  __device__ __forceinline__ const void* at(const Row& r, uint32_t kt) const { return codes + (r.off + (kt >> 1)); }
  __device__ __forceinline__ Chunk load(const Row& r, uint32_t kt) const {
    return {__ldg(reinterpret_cast<const uint4*>(at(r, kt)))};
  }
  __device__ __forceinline__ Chunk load(int64_t n, int64_t kt) const { return load(row(n), uint32_t(kt)); }
  static __device__ __forceinline__ Chunk zero() { return {make_uint4(0u, 0u, 0u, 0u)}; }

  // Codebooks col0 / rows_per_book + slot into shared memory, 32 copies each; entries past E (and slots
  // past L) are zero. A thread writes 4 copies of an entry as one 16-byte store, a warp 512 consecutive
  // bytes; the 8 threads of an entry read the same word (one L1 request).
  __device__ __forceinline__ void stage_tables(uint32_t* smem, int64_t col0) const {
    const int64_t first = col0 / rows_per_book;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(books);
    for (int idx = threadIdx.x; idx < kSlots * kEntries * 8; idx += small_m::kThreads) {
      const int e = (idx / 8) % kEntries, slot = idx / (8 * kEntries);
      const int64_t book = first + slot;
      const uint32_t v = book < L && e < E ? __ldg(words + book * E + e) : 0u;
      reinterpret_cast<uint4*>(smem)[idx] = make_uint4(v, v, v, v);  // words 32 (slot * 256 + e) + 4 (idx % 8)
    }
  }
  __device__ __forceinline__ RowState row_state(const uint32_t* smem, int64_t col0, int64_t n) const {
    const int64_t slot = n / rows_per_book - col0 / rows_per_book;
    return {smem_address(smem + (slot * kEntries * 32 + threadIdx.x % 32))};
  }
  __device__ __forceinline__ void b(const Chunk& c, const RowState& s, int i, int h, uint32_t& b0,
                                    uint32_t& b1) const {
    const uint32_t w = small_m::word(c.q, i);
    b0 = ld_shared32(s.tab + (small_m::prmt(w, 0u, 0x4440u + 2 * h) << 7));  // byte 2h, zero-extended: 128 B an entry
    b1 = ld_shared32(s.tab + (small_m::prmt(w, 0u, 0x4441u + 2 * h) << 7));
  }
  static __device__ __forceinline__ void a(const uint4& r0, const uint4& r1, int h, uint32_t (&a)[4]) {
    small_m::a_consecutive(r0, r1, h, a);
  }
  __device__ __forceinline__ float out_scale(int64_t) const { return 1.f; }
};

// REPARAM_VQ_SMALL_M=0 keeps pairs off the small-M path (its own switch beside REPARAM_SMALL_M, which still
// applies: run_gpu.sh smoke-tests this path alone and switches off only it if it fails on a GPU; the grouped
// op's loop reads the same lookup, so it obeys it too).
inline bool pairs_small_m_enabled() { return env_switch_on("REPARAM_VQ_SMALL_M"); }

// Whether every column block of the small-M path reads at most VqPairFrag::kSlots codebooks. Its blocks are
// BN = kWarpsN x 8 x groups_for<MT>() rows starting at multiples of BN (64 or 128 today, derived here so a
// change of tile cannot leave a block reading a slot that was never staged): a block crosses at most one
// codebook boundary when a codebook has >= BN rows, and holds BN / rows codebooks when rows divide BN.
inline bool books_fit_slots(int64_t L, int64_t rows_per_book) {
  constexpr int kSlots = VqPairFrag<__half>::kSlots;
  static_assert(kSlots >= 2, "a block straddling one boundary reads two codebooks");
  auto fits = [&](int64_t bn) {
    return rows_per_book >= bn || (bn % rows_per_book == 0 && bn / rows_per_book <= kSlots);
  };
  using small_m::groups_for, small_m::kWarpsN;
  return L <= kSlots || (fits(kWarpsN * 8 * groups_for<0>()) && fits(kWarpsN * 8 * groups_for<1>()) &&
                         fits(kWarpsN * 8 * groups_for<2>()) && fits(kWarpsN * 8 * groups_for<4>()));
}

}  // namespace reparam
