// The CUDA cross-entropy kernels of cross_entropy.cu, as host functions: the
// ops of ../cross_entropy.h run them once they have checked their arguments,
// and the fused linear ops (linear_cross_entropy.cpp) on each chunk of logits,
// whose arguments their own checks have covered. The signatures are those
// ../cross_entropy.h asks of a device's kernels; backward_inplace also takes a
// shard, which no op schema writes in place.
#pragma once

#include <ATen/core/Tensor.h>

#include "../cross_entropy.h"

#include <optional>

namespace myext {
namespace cuda {

struct CrossEntropyKernels {
  static CrossEntropyForward forward(const char* op, const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& sample_weight, const LossOptions& o);

  static at::Tensor backward(const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
                             const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                             const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                             const RowExtras& extras, const LossOptions& o, const ClassShard* shard);

  // The gradient written over `input`, contiguous: no second R x C buffer.
  static void backward_inplace(const char* op, const at::Tensor& grad_loss, at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                               const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                               const RowExtras& extras, const LossOptions& o, const ClassShard* shard);
};

}  // namespace cuda
}  // namespace myext
