// C entry point of the CPU execution harness: runs one op of csrc/ (its real host code and
// kernels, compiled for the CPU) on tensors handed over from Python (python_tests/cuda_on_cpu).
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "fake_torch.h"
#include "ops.h"

// Weak: a mutation build links only the units its cases' ops need (cuda_on_cpu.build), and an op
// whose unit is absent must fail with a message, not keep the library from loading.
namespace reparam {
Tensor lowrank_linear_cuda(Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor pivoted_lowrank_linear_cuda(Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor int8_linear_cuda(Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor int4_linear_cuda(Tensor, Tensor, Tensor, Tensor, int64_t, std::optional<Tensor>) __attribute__((weak));
Tensor grouped_int8_linear_cuda(Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor grouped_int4_linear_cuda(Tensor, Tensor, Tensor, Tensor, Tensor, int64_t, std::optional<Tensor>) __attribute__((weak));
Tensor grouped_lowrank_linear_cuda(Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>, Tensor, int64_t, int64_t, int64_t,
                                   std::optional<Tensor>) __attribute__((weak));
Tensor grouped_lut_linear_cuda(Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor grouped_vq_linear_cuda(Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor lut_linear_cuda(Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor vq_linear_cuda(Tensor, Tensor, Tensor, std::optional<Tensor>) __attribute__((weak));
Tensor block_circulant_linear_cuda(Tensor, Tensor, int64_t, int64_t, std::optional<Tensor>) __attribute__((weak));
Tensor block_circulant_cols_linear_cuda(Tensor, Tensor, int64_t, std::optional<Tensor>) __attribute__((weak));
Tensor toeplitz_linear_cuda(Tensor, Tensor, int64_t, int64_t, std::optional<Tensor>) __attribute__((weak));
}  // namespace reparam

namespace {
using torch::stable::Tensor;

// The op's function, or an error naming it when this build left its unit out.
template <class F>
F* built(F* f, const char* op) {
  if (f == nullptr) throw std::runtime_error(std::string("cuda_on_cpu: ") + op + "'s unit is not in this build");
  return f;
}

struct RkTensor {
  const void* data;  // nullptr: an absent optional argument
  int64_t dtype;     // torch ScalarType code
  int64_t ndim;
  int64_t sizes[8];
  int64_t offset;  // bytes of deliberate misalignment
};

// A copy of t in its own guarded storage (fake_torch.h), as a CUDA tensor would be.
Tensor adopt(const RkTensor& t) {
  const auto dtype = static_cast<torch::headeronly::ScalarType>(t.dtype);
  std::vector<int64_t> sizes(t.sizes, t.sizes + t.ndim);
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t bytes = size_t(n) * rk_cpu::element_size(dtype);
  auto st = std::make_shared<rk_cpu::Storage>(bytes, size_t(t.offset));
  std::memcpy(st->data, t.data, bytes);
  return Tensor(st, st->data, std::move(sizes), dtype);
}

std::optional<Tensor> opt(const RkTensor* t, int nt, int i) {
  if (i >= nt || t[i].data == nullptr) return std::nullopt;
  return adopt(t[i]);
}

Tensor call(const std::string& op, const RkTensor* t, int nt, const int64_t* ints) {
  using namespace reparam;
  const char* o = op.c_str();
  if (op == "lowrank_linear") return built(&lowrank_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), opt(t, nt, 3));
  if (op == "pivoted_lowrank_linear")
    return built(&pivoted_lowrank_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), opt(t, nt, 4));
  if (op == "int8_linear") return built(&int8_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), opt(t, nt, 3));
  if (op == "int4_linear")
    return built(&int4_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), ints[0], opt(t, nt, 4));
  if (op == "grouped_int8_linear")
    return built(&grouped_int8_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), opt(t, nt, 4));
  if (op == "grouped_int4_linear")
    return built(&grouped_int4_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), adopt(t[4]), ints[0],
                                               opt(t, nt, 5));
  if (op == "grouped_lowrank_linear")
    return built(&grouped_lowrank_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), opt(t, nt, 4),
                                                  adopt(t[5]), ints[0], ints[1], ints[2], opt(t, nt, 6));
  if (op == "grouped_lut_linear")
    return built(&grouped_lut_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), opt(t, nt, 4));
  if (op == "grouped_vq_linear")
    return built(&grouped_vq_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), adopt(t[3]), opt(t, nt, 4));
  if (op == "lut_linear") return built(&lut_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), opt(t, nt, 3));
  if (op == "vq_linear") return built(&vq_linear_cuda, o)(adopt(t[0]), adopt(t[1]), adopt(t[2]), opt(t, nt, 3));
  if (op == "block_circulant_linear")
    return built(&block_circulant_linear_cuda, o)(adopt(t[0]), adopt(t[1]), ints[0], ints[1], opt(t, nt, 2));
  if (op == "block_circulant_cols_linear")
    return built(&block_circulant_cols_linear_cuda, o)(adopt(t[0]), adopt(t[1]), ints[0], opt(t, nt, 2));
  if (op == "toeplitz_linear")
    return built(&toeplitz_linear_cuda, o)(adopt(t[0]), adopt(t[1]), ints[0], ints[1], opt(t, nt, 2));
  throw std::runtime_error("cuda_on_cpu: unknown op " + op);
}
}  // namespace

// Runs `op`; on success copies the output (out_bytes bytes expected) to `out` and returns 0, else
// writes the error message to `err` and returns 1.
extern "C" int rk_call(const char* op, const RkTensor* tensors, int nt, const int64_t* ints, void* out,
                       int64_t out_bytes, char* err, int errlen) {
  static std::once_flag once;
  std::call_once(once, rk_cpu::install_fault_report);
  try {
    Tensor y = call(op, tensors, nt, ints);
    const int64_t bytes = y.numel() * int64_t(rk_cpu::element_size(y.scalar_type()));
    if (bytes != out_bytes)
      throw std::runtime_error("output has " + std::to_string(bytes) + " bytes, expected " + std::to_string(out_bytes));
    std::memcpy(out, y.data_ptr(), size_t(bytes));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, size_t(errlen), "%s", e.what());
    return 1;
  }
}
