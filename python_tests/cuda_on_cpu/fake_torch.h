// The slice of PyTorch's stable ABI that csrc/ uses, on host memory: a Tensor that is always
// "on CUDA device 0", new_empty (guarded, 0xFF-filled), contiguous, reshape, narrow (strided views), the error macros,
// and torch_call_dispatcher for aten::linear.out (a float64-accumulated reference GEMM, standing
// in for cuBLAS).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace torch {
namespace headeronly {
enum class ScalarType : int8_t { Byte = 0, Char = 1, Short = 2, Int = 3, Long = 4, Half = 5, Float = 6, Double = 7, BFloat16 = 15 };
}  // namespace headeronly
}  // namespace torch

namespace rk_cpu {
size_t element_size(torch::headeronly::ScalarType t);
// `bytes` in their own mapping, ending at (or up to 15 bytes before) an inaccessible page, with
// one before the start too; `offset` bytes of slack at the front (misaligned views).
struct Storage {
  void* map = nullptr;
  size_t map_len = 0;
  unsigned char* data = nullptr;
  Storage(size_t bytes, size_t offset);
  ~Storage();
};
void install_fault_report();
}  // namespace rk_cpu

namespace torch {
namespace stable {
using torch::headeronly::ScalarType;

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<rk_cpu::Storage> st, void* data, std::vector<int64_t> sizes, ScalarType dtype,
         std::vector<int64_t> strides = {})
      : st_(std::move(st)), data_(data), sizes_(std::move(sizes)), strides_(std::move(strides)), dtype_(dtype) {
    if (strides_.empty()) {  // contiguous
      strides_.assign(sizes_.size(), 1);
      for (size_t d = sizes_.size(); d-- > 1;) strides_[d - 1] = strides_[d] * sizes_[d];
    }
  }
  int64_t dim() const { return int64_t(sizes_.size()); }
  int64_t size(int64_t d) const {
    if (d < 0) d += dim();
    if (d < 0 || d >= dim()) throw std::runtime_error("Tensor::size: dimension out of range");
    return sizes_[size_t(d)];
  }
  const std::vector<int64_t>& sizes() const { return sizes_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t stride(int64_t d) const {
    if (d < 0) d += dim();
    if (d < 0 || d >= dim()) throw std::runtime_error("Tensor::stride: dimension out of range");
    return strides_[size_t(d)];
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes_) n *= s;
    return n;
  }
  ScalarType scalar_type() const { return dtype_; }
  void* data_ptr() const { return data_; }
  bool is_cuda() const { return true; }
  int32_t get_device_index() const { return 0; }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (size_t d = sizes_.size(); d-- > 0;) {
      if (sizes_[d] != 1 && strides_[d] != expect) return false;
      expect *= sizes_[d];
    }
    return true;
  }
  bool defined() const { return data_ != nullptr || st_ != nullptr; }

 private:
  std::shared_ptr<rk_cpu::Storage> st_;
  void* data_ = nullptr;
  std::vector<int64_t> sizes_;
  std::vector<int64_t> strides_;
  ScalarType dtype_ = ScalarType::Float;
};

Tensor new_empty(const Tensor& like, std::vector<int64_t> sizes, std::optional<ScalarType> dtype = std::nullopt);
// the harness makes no copies: only tensors that already are contiguous pass
inline Tensor contiguous(const Tensor& t) {
  if (!t.is_contiguous()) throw std::runtime_error("contiguous: a copy of a strided view is not modelled");
  return t;
}
Tensor reshape(const Tensor& t, std::vector<int64_t> sizes);  // contiguous tensors only
Tensor narrow(Tensor& self, int64_t dim, int64_t start, int64_t length);  // a strided view, as torch's

namespace accelerator {
struct DeviceGuard {
  explicit DeviceGuard(int32_t) {}
};
}  // namespace accelerator

namespace detail {
uint64_t from(const Tensor& t);
uint64_t from(const std::optional<Tensor>& t);
template <class T>
T to(uint64_t v);
template <>
Tensor to<Tensor>(uint64_t v);
}  // namespace detail
}  // namespace stable
}  // namespace torch

using StableIValue = uint64_t;
#define TORCH_ABI_VERSION 0
int torch_call_dispatcher(const char* name, const char* overload, StableIValue* stack, uint64_t version);
inline int aoti_torch_get_current_cuda_stream(int32_t, void** s) {
  *s = nullptr;
  return 0;
}

namespace rk_cpu {
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}
}  // namespace rk_cpu

#define STD_TORCH_CHECK(cond, ...)                                                     \
  do {                                                                                 \
    if (!(cond)) throw std::runtime_error(::rk_cpu::cat("", ##__VA_ARGS__));           \
  } while (0)
#define STABLE_TORCH_ERROR_CODE_CHECK(expr)                                            \
  do {                                                                                 \
    if ((expr) != 0) throw std::runtime_error("stable ABI call failed: " #expr);       \
  } while (0)
