// CUDA on the CPU: the fibers, barriers and launches (see runtime.h for the model; the device
// operations are in device_ops.cpp, the runtime API in cuda_api.cpp).
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
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

#include "scheduler.h"

namespace rk_cpu {

// ------------------------------------------------------------------ fibers and blocks

namespace {
constexpr size_t kStack = 256 * 1024;

const char* state_name(int s) {
  static const char* names[] = {"running", "__syncthreads", "a warp collective", "grid.sync", "a warpgroup collective",
                                "exited"};
  return names[s];
}

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

}  // namespace

// The blocks of a cooperative launch and the barrier they share.
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

namespace {

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

}  // namespace

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

namespace {

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
  // RK_CPU_SKEW=n: at the start and after every block barrier each warp sits out a random 0..n rounds (a round
  // takes every ready thread to its next warp collective or barrier), so warps drift apart between barriers as
  // on a GPU: in lockstep rounds a warp never races ahead of a missing __syncthreads into shared memory another
  // warp still reads. Off by default.
  const uint64_t skew = env_u64("RK_CPU_SKEW", 0);
  std::vector<uint64_t> delay(warps, 0);
  auto draw_delays = [&] {
    for (auto& d : delay) d = skew > 0 ? rng() % (skew + 1) : 0;
  };
  draw_delays();
  std::vector<char> sits(warps, 0);
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);  // no thread order is promised between barriers
    bool sat = false;  // a Ready fiber sat this round out: the round may release nothing without a deadlock
    for (int w = 0; w < warps; ++w) {
      sits[w] = delay[w] > 0;
      delay[w] -= sits[w];
    }
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != Ready) continue;
      if (sits[i / 32]) {
        sat = true;
        continue;
      }
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
      draw_delays();
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
    if (!released && !sat) {
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

}  // namespace

// ------------------------------------------------------------------ device description (env)

int fake_sms() { return int(env_u64("RK_CPU_SMS", 4)); }
int fake_cc_major() { return int(env_u64("RK_CPU_CC_MAJOR", 9)); }
int fake_l2_bytes() { return int(env_u64("RK_CPU_L2_BYTES", 50u << 20)); }
cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

namespace {

std::mutex attr_mu;
std::map<const void*, int> max_dyn_smem;

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
Block* current_block() { return tl_block; }
static const uint3& no_thread() {
  throw std::runtime_error("threadIdx / blockIdx used outside a kernel");
}
const uint3& thread_idx() { return tl_fiber ? tl_fiber->tid : no_thread(); }
const uint3& block_idx() { return tl_block ? tl_block->bid : no_thread(); }
const dim3& block_dim() { return tl_block->bdim; }
const dim3& grid_dim() { return tl_block->gdim; }
void* dynamic_smem() { return tl_block->smem; }

void sync_block(const char* file, int line) { park(AtBlock, file, line); }
void warpgroup_barrier(const char* file, int line) {
  const unsigned char none = 0;
  exchange(128, AtGroup, &none, 1, [](const unsigned char*, size_t) {}, file, line);
}
void sync_warp(const char* file, int line) { park(AtWarp, file, line); }
void sync_grid(const char* file, int line) { park(AtGrid, file, line); }

void exchange(int size, int state, const void* in, size_t bytes,
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
  // RK_CPU_THREADS_PER_SM (unset: no limit) caps the CTAs by their threads, as registers cap them on a GPU
  const uint64_t per_sm = env_u64("RK_CPU_BLOCKS_PER_SM", 1), threads_cap = env_u64("RK_CPU_THREADS_PER_SM", 0);
  return int(threads_cap > 0 ? std::min<uint64_t>(per_sm, threads_cap / uint64_t(threads)) : per_sm);
}


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
