// Argument checks shared by the dispatcher ops of every device.
//
// The ops in torch.ops.myext are public: called directly, with arguments the
// Python layer would refuse, they must raise, never crash, read out of bounds
// or return an answer. Each check is cheap (shapes, dtypes, devices, codes: no
// data is read, so none synchronises with a GPU) and its message names the op
// and the argument.
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace myext {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf,
              op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", type);
}

// `t` on `ref`'s device.
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", ref.device());
}

// `t` on `ref`'s device, with its dtype.
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref) {
  check_device(op, name, t, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but input has ", ref.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-d, got shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// `t` is absent or a vector of `length` on `ref`'s device with its dtype.
inline void check_optional_vector(const char* op, const char* name,
                                  const std::optional<at::Tensor>& t, int64_t length,
                                  const at::Tensor& ref) {
  if (!t.has_value()) return;
  check_like(op, name, *t, ref);
  check_shape(op, name, *t, {length});
}

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean ||
                  reduction == at::Reduction::Sum,
              op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_unit_interval(const char* op, const char* name, double value) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, op, ": ", name, " must be in [0, 1], got ", value);
}

}  // namespace myext
