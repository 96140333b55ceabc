// CUDA on the CPU: fibers, barriers, launches, the runtime API and the number formats
// (see runtime.h for the model).
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "launch.h"

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

// ------------------------------------------------------------------ fibers and blocks

namespace {
constexpr size_t kStack = 256 * 1024;
constexpr size_t kSlot = 256;  // bytes per lane in a warp exchange

struct Copy {
  void* dst;
  unsigned char data[16];
  int n;
};

struct Grid;

enum State { Ready, AtBlock, AtWarp, AtGrid, AtGroup, Done };
const char* state_name(int s) {
  static const char* names[] = {"running", "__syncthreads", "a warp collective", "grid.sync", "a warpgroup collective",
                                "exited"};
  return names[s];
}

}  // namespace

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  int state = Ready;
  const char* file = "";
  int line = 0;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<struct Wgmma>> wg_groups;  // committed wgmma groups, oldest first
  std::vector<struct Wgmma> wg_open;
};

// One thread's share of an issued wgmma: its two A rows (16 k each) and where D and B are.
struct Wgmma {
  float* d;
  int n;
  double arow[2][16];
  uint64_t desc;
  bool half;
};

struct Block {
  uint3 bid;
  dim3 bdim, gdim;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> table;  // warp exchange, [warps][32][kSlot]
  std::string error;
  Grid* grid = nullptr;
};

namespace {

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

struct Grid {
  std::mutex mu;
  std::condition_variable cv;
  int blocks = 0, arrived = 0, finished = 0;
  long generation = 0;
  bool aborted = false;
  std::string error;

  void fail(const std::string& e) {
    std::lock_guard<std::mutex> lock(mu);
    if (error.empty()) error = e;
    aborted = true;
    cv.notify_all();
  }
  // All blocks meet here; a block that exits while others wait is an error (grid.sync would hang).
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu);
    const long gen = generation;
    if (++arrived == blocks) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    if (arrived + finished == blocks && finished > 0) {
      aborted = true;
      if (error.empty()) error = "grid.sync(): some blocks exited without reaching it (the grid barrier would hang)";
      cv.notify_all();
    }
    cv.wait(lock, [&] { return generation != gen || aborted; });
    if (aborted) throw std::runtime_error(error);
  }
  void block_done() {
    std::lock_guard<std::mutex> lock(mu);
    ++finished;
    if (arrived > 0 && arrived + finished == blocks) {
      aborted = true;
      if (error.empty()) error = "grid.sync(): some blocks exited without reaching it (the grid barrier would hang)";
      cv.notify_all();
    }
  }
};

std::string where(const Block& b, const Fiber* f) {
  std::ostringstream s;
  s << "block (" << b.bid.x << "," << b.bid.y << "," << b.bid.z << ")";
  if (f) s << " thread (" << f->tid.x << "," << f->tid.y << "," << f->tid.z << ")";
  return s.str();
}

void fiber_main() {
  Block* b = tl_block;
  Fiber* f = tl_fiber;
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = std::string(e.what()) + " in " + where(*b, f);
  }
  f->state = Done;
  swapcontext(&f->ctx, &b->sched);
}

void park(int state, const char* file, int line) {
  Fiber* f = tl_fiber;
  Block* b = tl_block;
  if (f == nullptr) throw std::runtime_error("a device barrier was called outside a kernel");
  f->state = state;
  f->file = file;
  f->line = line;
  swapcontext(&f->ctx, &b->sched);
  if (!b->error.empty()) throw std::runtime_error("abandoned");  // another thread failed: unwind this one
}

bool same_site(const Fiber& a, const Fiber& b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

std::string site(const Fiber& f) { return std::string(f.file) + ":" + std::to_string(f.line); }

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

// One block, start to end, on this OS thread.
void run_block(Block& b) {
  const int n = int(b.bdim.x * b.bdim.y * b.bdim.z);
  const int warps = (n + 31) / 32;
  b.fibers.assign(n, Fiber{});
  b.table.assign(size_t((warps + 3) / 4) * 128 * kSlot, 0);  // per warp 32 slots; a warpgroup uses its 4 warps' slots
  // one mapping for all stacks; the lowest kCanary bytes of each hold a pattern that a stack
  // overflow would overwrite (checked when the block ends: guard pages per fiber would cost a
  // mapping each, and a 264-block cooperative grid would exceed the kernel's mapping limit)
  constexpr size_t kCanary = 4096;
  char* stacks = static_cast<char*>(mmap(nullptr, size_t(n) * kStack, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) throw std::runtime_error("cuda_on_cpu: cannot map fiber stacks");
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = {unsigned(i % b.bdim.x), unsigned((i / b.bdim.x) % b.bdim.y), unsigned(i / (b.bdim.x * b.bdim.y))};
    std::memset(stacks + size_t(i) * kStack, 0xCD, kCanary);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks + size_t(i) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(env_u64("RK_CPU_SEED", 1) * 1000003u + b.bid.x * 7919u + b.bid.y * 104729u + b.bid.z);
  tl_block = &b;
  auto fail = [&](const std::string& e) {
    if (b.error.empty()) b.error = e;
  };
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);  // no thread order is promised between barriers
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != Ready) continue;
      tl_fiber = &f;
      swapcontext(&b.sched, &f.ctx);
      tl_fiber = nullptr;
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    int live = 0, at_block = 0, at_grid = 0;
    const Fiber* first_live = nullptr;
    for (const Fiber& f : b.fibers) {
      if (f.state == Done) continue;
      ++live;
      if (!first_live) first_live = &f;
      at_block += f.state == AtBlock;
      at_grid += f.state == AtGrid;
    }
    if (live == 0) break;
    bool released = false;
    if (at_block == live || at_grid == live) {
      for (const Fiber& f : b.fibers)
        if (f.state != Done && !same_site(f, *first_live)) {
          fail("divergent barrier: " + where(b, first_live) + " waits at " + site(*first_live) + ", " + where(b, &f) +
               " at " + site(f));
          break;
        }
      if (!b.error.empty()) break;
      if (at_grid == live) {
        if (b.grid == nullptr) {
          fail("grid.sync() in a kernel that was not launched cooperatively");
          break;
        }
        try {
          b.grid->arrive_and_wait();
        } catch (const std::exception& e) {
          fail(e.what());
          break;
        }
      }
      for (Fiber& f : b.fibers)
        if (f.state != Done) f.state = Ready;
      released = true;
    } else {
      // warps (32 lanes, AtWarp) and warpgroups (128 threads, AtGroup) complete the same way
      for (int w = 0; w < warps + (warps + 3) / 4; ++w) {
        const bool group = w >= warps;
        const int size = group ? 128 : 32, kind = group ? AtGroup : AtWarp;
        const int l0 = size * (group ? w - warps : w), l1 = std::min(n, l0 + size);
        int at_warp = 0, done = 0;
        for (int i = l0; i < l1; ++i) {
          at_warp += b.fibers[i].state == kind;
          done += b.fibers[i].state == Done;
        }
        if (at_warp == 0) continue;
        const Fiber& f0 = *std::find_if(&b.fibers[l0], &b.fibers[l0] + (l1 - l0), [&](const Fiber& f) { return f.state == kind; });
        if (done > 0 || (group && l1 - l0 < 128)) {
          fail(std::string(group ? "warpgroup" : "warp") + " collective at " + site(f0) + " in " + where(b, &f0) +
               " with exited or missing threads");
          break;
        }
        if (at_warp < l1 - l0) continue;  // others still at a block barrier: deadlock unless something moves
        for (int i = l0; i < l1; ++i)
          if (!same_site(b.fibers[i], f0)) {
            fail("divergent warp collective in " + where(b, &b.fibers[i]) + ": " + site(b.fibers[i]) + " vs " + site(f0));
            break;
          }
        if (!b.error.empty()) break;
        for (int i = l0; i < l1; ++i) b.fibers[i].state = Ready;
        released = true;
      }
      if (!b.error.empty()) break;
    }
    if (!released) {
      std::ostringstream s;
      s << "deadlock in " << where(b, nullptr) << ":";
      std::map<std::string, int> waits;
      for (const Fiber& f : b.fibers)
        if (f.state != Done) ++waits[std::string(state_name(f.state)) + " at " + site(f)];
      for (auto& [k, c] : waits) s << " " << c << " threads wait in " << k << ";";
      fail(s.str());
      break;
    }
  }
  tl_block = nullptr;
  for (int i = 0; i < n && b.error.empty(); ++i) {
    const unsigned char* low = reinterpret_cast<const unsigned char*>(stacks + size_t(i) * kStack);
    if (std::any_of(low, low + kCanary, [](unsigned char c) { return c != 0xCD; }))
      b.error = "fiber stack overflow (over " + std::to_string(kStack / 1024) + " KB) in " + where(b, &b.fibers[i]);
  }
  munmap(stacks, size_t(n) * kStack);
  if (b.grid) {
    if (b.error.empty()) b.grid->block_done();
    else b.grid->fail(b.error);
  }
  if (!b.error.empty()) throw std::runtime_error(b.error);
}

// ------------------------------------------------------------------ device description (env)

int fake_sms() { return int(env_u64("RK_CPU_SMS", 4)); }
int fake_cc_major() { return int(env_u64("RK_CPU_CC_MAJOR", 9)); }
constexpr int kSmemOptin = 227 * 1024;
constexpr int kSmemDefault = 48 * 1024;

std::mutex attr_mu;
std::map<const void*, int> max_dyn_smem;
thread_local cudaError_t last_error = cudaSuccess;

void check_config(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u)
    throw std::runtime_error("invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
                             std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block " +
                             std::to_string(threads) + " threads");
  int limit = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(attr_mu);
    auto it = max_dyn_smem.find(kernel);
    if (it != max_dyn_smem.end()) limit = it->second;
  }
  if (smem > size_t(limit))
    throw std::runtime_error("launch with " + std::to_string(smem) + " bytes of dynamic shared memory, above the " +
                             std::to_string(limit) + " allowed (cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
}

}  // namespace

Fiber* current_fiber() { return tl_fiber; }
static const uint3& no_thread() {
  throw std::runtime_error("threadIdx / blockIdx used outside a kernel");
}
const uint3& thread_idx() { return tl_fiber ? tl_fiber->tid : no_thread(); }
const uint3& block_idx() { return tl_block ? tl_block->bid : no_thread(); }
const dim3& block_dim() { return tl_block->bdim; }
const dim3& grid_dim() { return tl_block->gdim; }
void* dynamic_smem() { return tl_block->smem; }

void sync_block(const char* file, int line) { park(AtBlock, file, line); }
void sync_warp(const char* file, int line) { park(AtWarp, file, line); }
void sync_grid(const char* file, int line) { park(AtGrid, file, line); }

// Writes `in` to this thread's slot of its warp's (size 32) or warpgroup's (size 128) table, waits
// for all of them, hands the table to `out`, and waits again (so the table may be reused).
static void exchange(int size, int state, const void* in, size_t bytes,
                     const std::function<void(const unsigned char*, size_t)>& out, const char* file, int line) {
  if (bytes > kSlot) throw std::runtime_error("exchange payload too large");
  Block* b = tl_block;
  const int me = tl_fiber->linear % size, group = tl_fiber->linear / size;
  unsigned char* base = b->table.data() + size_t(group) * size * kSlot;
  std::memcpy(base + size_t(me) * kSlot, in, bytes);
  park(state, file, line);
  out(base, kSlot);
  park(state, file, line);
}

void warp_exchange(const void* in, size_t bytes, const std::function<void(const unsigned char*, size_t)>& out,
                   const char* file, int line) {
  exchange(32, AtWarp, in, bytes, out, file, line);
}

uint32_t smem_offset(const void* p) {
  const auto* base = static_cast<const unsigned char*>(tl_block->smem);
  return uint32_t(static_cast<const unsigned char*>(p) - base);
}

void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc, bool half, const char* file, int line) {
  if (n % 8 != 0 || n < 8 || n > 256) throw std::runtime_error("wgmma: N must be a multiple of 8 in 8..256");
  const int lane = tl_fiber->linear % 32, w = (tl_fiber->linear % 128) / 32, g = lane / 4;
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
  tl_fiber->wg_open.push_back(op);
}

void wgmma_commit() {
  tl_fiber->wg_groups.push_back(std::move(tl_fiber->wg_open));
  tl_fiber->wg_open.clear();
}

// Retires all but the newest n groups: D += A B with B read from shared memory now.
void wgmma_wait(int n) {
  Block* b = tl_block;
  const int lane = tl_fiber->linear % 32, t = lane % 4;
  auto& groups = tl_fiber->wg_groups;
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
  const int lane = tl_fiber->linear % 32, g = lane / 4, t = lane % 4;
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
  if (src_bytes > 0) std::memcpy(c.data, gmem, size_t(src_bytes));  // the source is read now ...
  if (env_u64("RK_CPU_CP_ASYNC_EARLY", 0)) {  // ... and lands now (the earliest the hardware may)
    std::memcpy(smem, c.data, 16);
    std::memset(static_cast<unsigned char*>(smem) + src_bytes, 0, size_t(16 - src_bytes));
    return;
  }
  tl_fiber->open.push_back(c);
}
void cp_async_commit() {
  tl_fiber->groups.push_back(std::move(tl_fiber->open));
  tl_fiber->open.clear();
}
void cp_async_wait(int n) {  // ... and lands in shared memory only here (the latest it may)
  auto& g = tl_fiber->groups;
  while (int(g.size()) > n) {
    for (const Copy& c : g.front()) {
      std::memcpy(c.dst, c.data, size_t(c.n));
      std::memset(static_cast<unsigned char*>(c.dst) + c.n, 0, size_t(16 - c.n));
    }
    g.erase(g.begin());
  }
}

// ------------------------------------------------------------------ launches

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(attr_mu);
  max_dyn_smem[kernel] = std::min(bytes, kSmemOptin);
}

int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  int limit = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(attr_mu);
    auto it = max_dyn_smem.find(kernel);
    if (it != max_dyn_smem.end()) limit = it->second;
  }
  if (smem > size_t(limit) || threads <= 0 || threads > 1024) return 0;
  return int(env_u64("RK_CPU_BLOCKS_PER_SM", 1));
}

void set_last_error(cudaError_t e) { last_error = e; }
int fake_arch_version() { return 10 * fake_cc_major(); }
int fake_ptx_version() { return int(env_u64("RK_CPU_PTX_VERSION", uint64_t(fake_arch_version()))); }

// RK_CPU_TRACE=1: one line per launch on stderr, which tests read to know which path ran.
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, bool cooperative,
              const std::function<void()>& body) {
  if (env_u64("RK_CPU_TRACE", 0))
    std::fprintf(stderr, "launch %s grid (%u,%u,%u) block %u smem %zu%s\n", name, grid.x,
                 grid.y, grid.z, block.x * block.y * block.z, smem, cooperative ? " cooperative" : "");
  check_config(kernel, grid, block, smem);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (cooperative && nblocks > uint64_t(blocks_per_sm(kernel, int(block.x * block.y * block.z), smem)) * fake_sms())
    throw std::runtime_error("cooperative launch of " + std::to_string(nblocks) +
                             " blocks: more than can be resident at once (cudaErrorCooperativeLaunchTooLarge)");
  if (nblocks > 100000) throw std::runtime_error("cuda_on_cpu: grid too large to emulate");
  std::vector<uint3> ids;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ids.push_back({x, y, z});
  std::mt19937_64 rng(env_u64("RK_CPU_SEED", 1));
  std::shuffle(ids.begin(), ids.end(), rng);  // no block order is promised
  Grid g;
  g.blocks = int(nblocks);
  const int workers = cooperative ? int(nblocks) : int(std::min<uint64_t>(nblocks, env_u64("RK_CPU_WORKERS", 3)));
  std::atomic<size_t> next{0};
  std::mutex err_mu;
  std::string first_error;
  auto worker = [&] {
    stack_t alt{};  // the segfault report runs on its own stack (the fault may be a fiber's stack)
    alt.ss_sp = std::malloc(1 << 16);
    alt.ss_size = 1 << 16;
    sigaltstack(&alt, nullptr);
    std::vector<unsigned char> smem_buf(smem + 128);
    unsigned char* smem_base =
        reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_buf.data()) + 127) & ~uintptr_t(127));
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= ids.size()) break;
      {
        std::lock_guard<std::mutex> lock(err_mu);
        if (!first_error.empty()) break;
      }
      Block b;
      b.bid = ids[i];
      b.bdim = block;
      b.gdim = grid;
      std::memset(smem_base, 0xFF, smem);  // shared memory starts as garbage: NaN for floats
      b.smem = smem_base;
      b.smem_bytes = smem;
      b.body = &body;
      b.grid = cooperative ? &g : nullptr;
      try {
        run_block(b);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = e.what();
        if (cooperative) g.fail(e.what());
      }
    }
    stack_t off{};
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, nullptr);
    std::free(alt.ss_sp);
  };
  std::vector<std::thread> threads;
  try {
    for (int w = 0; w < workers; ++w) threads.emplace_back(worker);
  } catch (const std::exception& e) {  // out of threads: stop the others (a cooperative grid would hang) and report
    g.fail(std::string("cuda_on_cpu: cannot start the block threads: ") + e.what());
    {
      std::lock_guard<std::mutex> lock(err_mu);
      if (first_error.empty()) first_error = std::string("cuda_on_cpu: cannot start the block threads: ") + e.what();
    }
    next.store(ids.size());
  }
  for (auto& t : threads) t.join();
  if (!first_error.empty()) throw std::runtime_error(first_error);
}

// Which block / thread faulted (a read or write outside every tensor lands on a guard page).
static void on_segv(int sig, siginfo_t* info, void*) {
  char msg[256];
  const Block* b = tl_block;
  const Fiber* f = tl_fiber;
  int len = snprintf(msg, sizeof msg, "cuda_on_cpu: %s at address %p", sig == SIGSEGV ? "segfault" : "bus error",
                     info->si_addr);
  if (b) len += snprintf(msg + len, sizeof msg - len, " in block (%u,%u,%u)", b->bid.x, b->bid.y, b->bid.z);
  if (f) len += snprintf(msg + len, sizeof msg - len, " thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
  len += snprintf(msg + len, sizeof msg - len, ": an access outside every tensor\n");
  (void)!write(2, msg, size_t(len));
  _exit(139);
}

void install_fault_report() {
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace rk_cpu

// ------------------------------------------------------------------ runtime API

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = rk_cpu::last_error;
  rk_cpu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = rk_cpu::fake_sms(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = rk_cpu::fake_cc_major(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = rk_cpu::kSmemOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes);
  if (*p) std::memset(*p, 0xA5, bytes);  // garbage: the caller must initialize
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static int token;
  *s = &token;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) { return cudaSuccess; }
