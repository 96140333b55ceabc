// CUDA on the CPU: the device operations the kernels call — the fp16 / bf16 formats, mma.sync,
// wgmma, cp.async, the warp exchange (see runtime.h for the model).
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "scheduler.h"

namespace rk_cpu {

// ------------------------------------------------------------------ number formats

uint32_t round_to_bits(double v, int mbits, int ebits) {
  const uint32_t sign = std::signbit(v) ? (1u << (mbits + ebits)) : 0u;
  const uint32_t emax = (1u << ebits) - 1u, inf = sign | (emax << mbits);
  if (std::isnan(v)) return inf | (1u << (mbits - 1));
  const double a = std::fabs(v);
  const int bias = (1 << (ebits - 1)) - 1, emin = 1 - bias;
  if (a < std::ldexp(1.0, emin)) {  // subnormal: units of 2^(emin - mbits); rounding up to 2^mbits is the smallest normal
    return sign | uint32_t(std::nearbyint(std::ldexp(a, mbits - emin)));
  }
  int e = 0;
  const double m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  double f = std::nearbyint(std::ldexp(2.0 * m - 1.0, mbits));
  int E = e - 1 + bias;
  if (f == std::ldexp(1.0, mbits)) {
    f = 0;
    ++E;
  }
  if (E >= int(emax)) return inf;
  return sign | (uint32_t(E) << mbits) | uint32_t(f);
}

double bits_to_double(uint32_t bits, int mbits, int ebits) {
  const bool neg = (bits >> (mbits + ebits)) & 1u;
  const uint32_t E = (bits >> mbits) & ((1u << ebits) - 1u), f = bits & ((1u << mbits) - 1u);
  const int bias = (1 << (ebits - 1)) - 1;
  double v;
  if (E == (1u << ebits) - 1u) v = f ? NAN : INFINITY;
  else if (E == 0) v = std::ldexp(double(f), 1 - bias - mbits);
  else v = std::ldexp(1.0 + std::ldexp(double(f), -mbits), int(E) - bias);
  return neg ? -v : v;
}

// ------------------------------------------------------------------ collectives and async copies

uint32_t smem_offset(const void* p) {
  const auto* base = static_cast<const unsigned char*>(current_block()->smem);
  return uint32_t(static_cast<const unsigned char*>(p) - base);
}

void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc, bool half, const char* file, int line) {
  if (n % 8 != 0 || n < 8 || n > 256) throw std::runtime_error("wgmma: N must be a multiple of 8 in 8..256");
  const int lane = current_fiber()->linear % 32, w = (current_fiber()->linear % 128) / 32, g = lane / 4;
  Wgmma op{d, n, {}, desc, half};
  auto val = [half](uint32_t reg, int which) {
    const uint32_t bits = (reg >> (16 * which)) & 0xFFFFu;
    return half ? bits_to_double(bits, 10, 5) : bits_to_double(bits, 7, 8);
  };
  uint32_t mine[4] = {a[0], a[1], a[2], a[3]};
  exchange(128, AtGroup, mine, sizeof(mine), [&](const unsigned char* tb, size_t stride) {
    // A row r (0..63) of the instruction: warp r / 16; inside it the mma.sync m16n8k16 A layout
    for (int v1 = 0; v1 < 2; ++v1) {
      const int r = 16 * w + g + 8 * v1, rr = r % 16;
      for (int k = 0; k < 16; ++k) {
        const auto* regs = reinterpret_cast<const uint32_t*>(tb + stride * (32 * (r / 16) + 4 * (rr % 8) + (k % 8) / 2));
        op.arow[v1][k] = val(regs[(rr / 8) + 2 * (k / 8)], k % 2);
      }
    }
  }, file, line);
  current_fiber()->wg_open.push_back(op);
}

void wgmma_commit() {
  current_fiber()->wg_groups.push_back(std::move(current_fiber()->wg_open));
  current_fiber()->wg_open.clear();
}

// Retires all but the newest n groups: D += A B with B read from shared memory now.
void wgmma_wait(int n) {
  Block* b = current_block();
  const int lane = current_fiber()->linear % 32, t = lane % 4;
  auto& groups = current_fiber()->wg_groups;
  while (int(groups.size()) > n) {
    for (const Wgmma& op : groups.front()) {
      const uint32_t start = uint32_t(op.desc & 0x3FFFu) << 4, lbo = uint32_t((op.desc >> 16) & 0x3FFFu) << 4,
                     sbo = uint32_t((op.desc >> 32) & 0x3FFFu) << 4, layout = uint32_t(op.desc >> 62);
      if (layout != 0 || ((op.desc >> 49) & 7u) != 0)
        throw std::runtime_error("wgmma model: only the no-swizzle layout with base offset 0 is modelled");
      auto B = [&](int k, int col) {  // K-major: row col of the N x 16 tile, element k
        const size_t off = size_t(start) + size_t(col % 8) * 16 + size_t(col / 8) * sbo + size_t(k / 8) * lbo + 2 * size_t(k % 8);
        if (off + 2 > b->smem_bytes) throw std::runtime_error("wgmma: descriptor reads past the dynamic shared memory");
        uint16_t bits;
        std::memcpy(&bits, b->smem + off, 2);
        return op.half ? bits_to_double(bits, 10, 5) : bits_to_double(bits, 7, 8);
      };
      for (int e = 0; e < op.n / 2; ++e) {
        const int j = e / 4, v0 = e % 2, v1 = (e / 2) % 2, col = 8 * j + 2 * t + v0;
        double s = op.d[e];
        for (int k = 0; k < 16; ++k) s += op.arow[v1][k] * B(k, col);
        op.d[e] = float(s);
      }
    }
    groups.erase(groups.begin());
  }
}

void trap(const char* what) { throw std::runtime_error(std::string("device trap: ") + what); }

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool half, const char* file,
                  int line) {
  struct Payload {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const int lane = current_fiber()->linear % 32, g = lane / 4, t = lane % 4;
  auto val = [half](uint32_t reg, int which) {
    const uint32_t bits = (reg >> (16 * which)) & 0xFFFFu;
    return half ? bits_to_double(bits, 10, 5) : bits_to_double(bits, 7, 8);
  };
  float out[4];
  warp_exchange(&mine, sizeof(mine), [&](const unsigned char* tb, size_t stride) {
    auto lane_of = [&](int l) { return reinterpret_cast<const Payload*>(tb + stride * l); };
    auto A = [&](int r, int k) {  // register (r / 8) + 2 (k / 8) of lane 4 (r % 8) + (k % 8) / 2, half k % 2
      return val(lane_of(4 * (r % 8) + (k % 8) / 2)->a[(r / 8) + 2 * (k / 8)], k % 2);
    };
    auto B = [&](int k, int n) { return val(lane_of(4 * n + (k % 8) / 2)->b[k / 8], k % 2); };
    for (int c = 0; c < 4; ++c) {
      const int r = g + 8 * (c / 2), n = 2 * t + c % 2;
      double s = d[c];
      for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
      out[c] = float(s);
    }
  }, file, line);
  for (int c = 0; c < 4; ++c) d[c] = out[c];
}

void cp_async16(void* smem, const void* gmem, int src_bytes) {
  Copy c{smem, {}, src_bytes};
  if (src_bytes < 0 || src_bytes > 16) throw std::runtime_error("cp.async with src_bytes outside 0..16");
  // A partial source (1..15 bytes) is legal PTX, but compute-sanitizer's memcheck counts the whole 16-byte
  // window as read and reports it past the end of an allocation (it did on an H200): the kernels copy a
  // partial tail by plain loads instead, and this keeps it that way.
  if (src_bytes > 0 && src_bytes < 16) throw std::runtime_error("cp.async with a partial source (1..15 bytes)");
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0)
    throw std::runtime_error("cp.async of 16 bytes with a source or destination not 16-byte aligned");
  if (src_bytes > 0) std::memcpy(c.data, gmem, size_t(src_bytes));  // the source is read now ...
  static const bool early = env_u64("RK_CPU_CP_ASYNC_EARLY", 0) != 0;  // read once: this runs per copy
  if (early) {  // ... and lands now (the earliest the hardware may)
    std::memcpy(smem, c.data, 16);
    std::memset(static_cast<unsigned char*>(smem) + src_bytes, 0, size_t(16 - src_bytes));
    return;
  }
  current_fiber()->open.push_back(c);
}
void prefetch_l2(const void* p) {
  const volatile unsigned char* c = static_cast<const volatile unsigned char*>(p);
  (void)*c;
}
void cp_async_commit() {
  current_fiber()->groups.push_back(std::move(current_fiber()->open));
  current_fiber()->open.clear();
}
void cp_async_wait(int n) {  // ... and lands in shared memory only here (the latest it may)
  auto& g = current_fiber()->groups;
  while (int(g.size()) > n) {
    for (const Copy& c : g.front()) {
      std::memcpy(c.dst, c.data, size_t(c.n));
      std::memset(static_cast<unsigned char*>(c.dst) + c.n, 0, size_t(16 - c.n));
    }
    g.erase(g.begin());
  }
}

}  // namespace rk_cpu
