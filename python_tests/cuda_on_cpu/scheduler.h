// Internal to the CUDA-on-CPU runtime (the kernel sources never see it): the fibers and blocks that
// scheduler.cpp runs, for the device operations (device_ops.cpp) and the runtime API (cuda_api.cpp).
#pragma once

#include <ucontext.h>

#include <functional>
#include <string>
#include <vector>

#include "launch.h"

namespace rk_cpu {

constexpr size_t kSlot = 256;  // bytes per thread in a warp / warpgroup exchange
constexpr int kSmemOptin = 227 * 1024;
constexpr int kSmemDefault = 48 * 1024;

enum State { Ready, AtBlock, AtWarp, AtGrid, AtGroup, Done };

// One 16-byte cp.async: its source bytes (read at issue) and destination.
struct Copy {
  void* dst;
  unsigned char data[16];
  int n;
};

// One thread's share of an issued wgmma: its two A rows (16 k each) and where D and B are.
struct Wgmma {
  float* d;
  int n;
  double arow[2][16];
  uint64_t desc;
  bool half;
};

struct Grid;

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  int state = Ready;
  const char* file = "";
  int line = 0;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Wgmma>> wg_groups;  // committed wgmma groups, oldest first
  std::vector<Wgmma> wg_open;
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

Block* current_block();  // the block running on this OS thread (current_fiber(): runtime.h)

// Writes `in` to this thread's slot of its warp's (size 32, AtWarp) or warpgroup's (size 128, AtGroup)
// table, waits for all of them, hands the table to `out`, and waits again (so the table may be reused).
void exchange(int size, int state, const void* in, size_t bytes,
              const std::function<void(const unsigned char*, size_t)>& out, const char* file, int line);

uint64_t env_u64(const char* name, uint64_t fallback);
int fake_sms();       // RK_CPU_SMS
int fake_cc_major();  // RK_CPU_CC_MAJOR
int fake_l2_bytes();  // RK_CPU_L2_BYTES (an H200's 50 MB unless set)
cudaError_t& last_error();

}  // namespace rk_cpu
