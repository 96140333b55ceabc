// The stable-ABI slice of fake_torch.h on host memory.
#include "fake_torch.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>

#include "runtime.h"

namespace rk_cpu {

size_t element_size(torch::headeronly::ScalarType t) {
  using S = torch::headeronly::ScalarType;
  switch (t) {
    case S::Byte: case S::Char: return 1;
    case S::Short: case S::Half: case S::BFloat16: return 2;
    case S::Int: case S::Float: return 4;
    case S::Long: case S::Double: return 8;
  }
  throw std::runtime_error("element_size: unknown dtype");
}

Storage::Storage(size_t bytes, size_t offset) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t need = bytes + offset + 16;
  const size_t body = (need + page - 1) / page * page;
  map_len = body + 2 * page;
  map = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) throw std::runtime_error("cuda_on_cpu: cannot map a tensor");
  unsigned char* lo = static_cast<unsigned char*>(map) + page;
  mprotect(lo, body, PROT_READ | PROT_WRITE);
  // end the data at the guard page (16-byte aligned start, as the CUDA allocator gives at least),
  // then shift by `offset` for deliberately misaligned views
  uintptr_t start = (reinterpret_cast<uintptr_t>(lo + body) - bytes - offset) & ~uintptr_t(15);
  data = reinterpret_cast<unsigned char*>(start) + offset;
  std::memset(lo, 0xFF, body);  // fresh memory is garbage: NaN for floats
}
Storage::~Storage() { munmap(map, map_len); }

}  // namespace rk_cpu

namespace torch {
namespace stable {

Tensor new_empty(const Tensor& like, std::vector<int64_t> sizes, std::optional<ScalarType> dtype) {
  const ScalarType t = dtype.value_or(like.scalar_type());
  int64_t n = 1;
  for (int64_t s : sizes) {
    if (s < 0) throw std::runtime_error("new_empty: negative size");
    n *= s;
  }
  auto st = std::make_shared<rk_cpu::Storage>(size_t(n) * rk_cpu::element_size(t), 0);
  return Tensor(st, st->data, std::move(sizes), t);
}

namespace {
// A view of t's storage at `data`: the new handle keeps a copy of t's handle (and so its storage) alive
// (aliasing constructor); empty strides: contiguous.
Tensor view_of(const Tensor& t, void* data, std::vector<int64_t> sizes, std::vector<int64_t> strides) {
  return Tensor(std::shared_ptr<rk_cpu::Storage>(std::make_shared<Tensor>(t), nullptr), data, std::move(sizes),
                t.scalar_type(), std::move(strides));
}
}  // namespace

Tensor reshape(const Tensor& t, std::vector<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  if (n != t.numel()) throw std::runtime_error("reshape: element count changes");
  if (!t.is_contiguous()) throw std::runtime_error("reshape: a strided view (a copy is not modelled)");
  return view_of(t, t.data_ptr(), std::move(sizes), {});
}

Tensor narrow(Tensor& self, int64_t dim, int64_t start, int64_t length) {
  if (dim < 0) dim += self.dim();
  if (dim < 0 || dim >= self.dim()) throw std::runtime_error("narrow: dimension out of range");
  if (start < 0 || length < 0 || start + length > self.size(dim))
    throw std::runtime_error("narrow: range out of bounds");
  std::vector<int64_t> sizes = self.sizes();
  sizes[size_t(dim)] = length;
  auto* data = static_cast<unsigned char*>(self.data_ptr()) +
               start * self.stride(dim) * int64_t(rk_cpu::element_size(self.scalar_type()));
  return view_of(self, data, std::move(sizes), self.strides());
}

namespace detail {
uint64_t from(const Tensor& t) { return reinterpret_cast<uint64_t>(new Tensor(t)); }
uint64_t from(const std::optional<Tensor>& t) { return t.has_value() ? from(*t) : 0; }
template <>
Tensor to<Tensor>(uint64_t v) {
  Tensor* p = reinterpret_cast<Tensor*>(v);
  Tensor out = *p;
  delete p;
  return out;
}
}  // namespace detail
}  // namespace stable
}  // namespace torch

namespace {
using torch::stable::Tensor;
using S = torch::headeronly::ScalarType;

double load(const Tensor& t, int64_t i) {
  switch (t.scalar_type()) {
    case S::Half: return rk_d(static_cast<const __half*>(t.data_ptr())[i]);
    case S::BFloat16: return rk_d(static_cast<const __nv_bfloat16*>(t.data_ptr())[i]);
    case S::Float: return static_cast<const float*>(t.data_ptr())[i];
    default: throw std::runtime_error("aten::linear.out (cuda_on_cpu): unsupported dtype");
  }
}
void store(const Tensor& t, int64_t i, double v) {
  switch (t.scalar_type()) {
    case S::Half: static_cast<__half*>(t.data_ptr())[i] = rk_half(v); return;
    case S::BFloat16: static_cast<__nv_bfloat16*>(t.data_ptr())[i] = rk_bf16(v); return;
    case S::Float: static_cast<float*>(t.data_ptr())[i] = float(v); return;
    default: throw std::runtime_error("aten::linear.out (cuda_on_cpu): unsupported dtype");
  }
}
}  // namespace

// aten::linear.out(input [M, K], weight [N, K], bias [N]?, out [M, N]): what cuBLAS computes, with
// the same argument checks that would fail there.
int torch_call_dispatcher(const char* name, const char* overload, StableIValue* stack, uint64_t) {
  if (std::strcmp(name, "aten::linear") != 0 || std::strcmp(overload, "out") != 0)
    throw std::runtime_error(std::string("cuda_on_cpu: no fake for ") + name + "." + overload);
  Tensor in = torch::stable::detail::to<Tensor>(stack[0]);
  Tensor w = torch::stable::detail::to<Tensor>(stack[1]);
  std::optional<Tensor> bias;
  if (stack[2]) bias = torch::stable::detail::to<Tensor>(stack[2]);
  Tensor out = torch::stable::detail::to<Tensor>(stack[3]);
  if (in.dim() != 2 || w.dim() != 2 || out.dim() != 2) throw std::runtime_error("aten::linear.out: expects 2-D tensors here");
  const int64_t M = in.size(0), K = in.size(1), N = w.size(0);
  if (w.size(1) != K || out.size(0) != M || out.size(1) != N || (bias && bias->numel() != N))
    throw std::runtime_error("aten::linear.out: shape mismatch");
  if (w.scalar_type() != in.scalar_type() || out.scalar_type() != in.scalar_type() ||
      (bias && bias->scalar_type() != in.scalar_type()))
    throw std::runtime_error("aten::linear.out: dtype mismatch");
  // any strides, as cuBLAS takes leading dimensions (the dequantize path writes column ranges of y)
  const int64_t bs = bias ? bias->stride(0) : 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = bias ? load(*bias, n * bs) : 0.0;
      for (int64_t k = 0; k < K; ++k)
        s += load(in, m * in.stride(0) + k * in.stride(1)) * load(w, n * w.stride(0) + k * w.stride(1));
      store(out, m * out.stride(0) + n * out.stride(1), s);
    }
  stack[0] = torch::stable::detail::from(out);
  return 0;
}
