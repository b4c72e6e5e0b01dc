// The CPU GEMMs the ops share: oneDNN's matmul where it is faster than ATen's
// BLAS, else ATen's (at::mm / at::addmm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <string>

namespace myext {
namespace cpu {

// oneDNN's matmul, reached through the op torch.compile's CPU backend uses for
// linear layers (mkldnn::_linear_pointwise). On the project's AMD AVX-512 CPUs,
// where ATen's BLAS (MKL) takes its AVX2 path, it runs float32 GEMMs of SimpleNet's
// and MLP sizes faster than at::mm; below kOneDnnMinFlops its per-call set-up costs
// more than it saves (docs/BENCHMARKS.md has the measurements). Only its GEMM and
// bias are used: its ReLU post-op would turn NaN into 0.
constexpr double kOneDnnMinFlops = 8e6;

// The op, or nullptr where this torch lacks it or has changed its schema (it is
// internal to torch): then at::mm does all the GEMMs.
inline const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto found = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value() || !found->hasSchema()) return std::nullopt;
    const auto& args = found->schema().arguments();
    const std::array<const char*, 6> expected{"X", "W", "B", "attr", "scalars", "algorithm"};
    if (args.size() != expected.size()) return std::nullopt;
    for (size_t i = 0; i < expected.size(); ++i) {
      if (args[i].name() != expected[i]) return std::nullopt;
    }
    return found;
  }();
  return op.has_value() ? &*op : nullptr;
}

inline bool use_onednn(const at::Tensor& a, int64_t rows, int64_t inner, int64_t cols) {
  return a.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() &&
         2.0 * static_cast<double>(rows) * inner * cols >= kOneDnnMinFlops &&
         onednn_linear_op() != nullptr;
}

// a (rows, inner) @ b_t (cols, inner)^T (+ bias), i.e. F.linear(a, b_t, bias), as a
// contiguous (rows, cols) tensor; a and b_t may have any strides.
inline at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& b_t,
                         const std::optional<at::Tensor>& bias) {
  torch::jit::Stack stack{a, b_t, bias, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  onednn_linear_op()->callBoxed(stack);
  return stack.back().toTensor().contiguous();
}

// a (rows, inner) @ b (inner, cols), by oneDNN where use_onednn says so.
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(a, a.size(0), a.size(1), b.size(1))) {
    return onednn_linear(a, b.t(), std::nullopt);
  }
  return a.mm(b);
}

}  // namespace cpu
}  // namespace myext
