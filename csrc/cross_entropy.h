// The argument checks of the cross-entropy ops, shared by their CPU and CUDA
// kernels (schemas in myext.cpp).
#pragma once

#include "checks.h"

#include <cmath>

namespace myext {

// The options: the reduction code, label smoothing in [0, 1], the z-loss scale
// and the soft cap (0: none), both finite and >= 0.
inline void check_cross_entropy_options(const char* op, int64_t reduction, double label_smoothing,
                                        double lse_square_scale, double softcap) {
  check_reduction(op, reduction);
  check_unit_interval(op, "label_smoothing", label_smoothing);
  TORCH_CHECK(std::isfinite(lse_square_scale) && lse_square_scale >= 0, op,
              ": lse_square_scale must be finite and >= 0, got ", lse_square_scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and > 0, or 0 for none, got ",
              softcap);
}

// target (rows,) int64 class indices or (rows, classes) probabilities of the
// dtype of `ref` (the logits, or the input they are computed from); weight
// (classes) of that dtype, or absent. Class indices themselves are checked by
// the kernels as they read them.
inline void check_cross_entropy_targets(const char* op, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, int64_t rows,
                                        int64_t classes, const at::Tensor& ref) {
  check_device(op, "target", target, ref);
  if (target.is_floating_point()) {
    check_like(op, "target", target, ref);
    check_shape(op, "target (probabilities)", target, {rows, classes});
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": target must hold int64 class indices or probabilities of the input's dtype, got ",
                target.scalar_type());
    check_shape(op, "target (class indices)", target, {rows});
  }
  check_optional_vector(op, "weight", weight, classes, ref);
}

// input (R, C) logits, and targets and weights for them.
inline void check_cross_entropy_inputs(const char* op, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       int64_t reduction, double label_smoothing,
                                       double lse_square_scale, double softcap) {
  check_floating(op, "input", input);
  check_dim(op, "input", input, 2);
  check_cross_entropy_targets(op, target, weight, input.size(0), input.size(1), input);
  check_cross_entropy_options(op, reduction, label_smoothing, lse_square_scale, softcap);
}

// Each row's row_max and row_log_sum (rows,) and the mean's divisor (a scalar),
// as a forward op returned them, on the device of `ref`; grad_loss (rows,) for
// reduction none, else a scalar.
inline void check_cross_entropy_row_outputs(const char* op, const at::Tensor& grad_loss,
                                            const at::Tensor& row_max, const at::Tensor& row_log_sum,
                                            const at::Tensor& total_weight, int64_t rows,
                                            int64_t reduction, const at::Tensor& ref) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"row_max", row_max},
                                {"row_log_sum", row_log_sum}}) {
    check_floating(op, name, t);
    check_device(op, name, t, ref);
    check_shape(op, name, t, {rows});
  }
  check_floating(op, "total_weight", total_weight);
  check_device(op, "total_weight", total_weight, ref);
  check_shape(op, "total_weight", total_weight, {});
  check_floating(op, "grad_loss", grad_loss);
  check_device(op, "grad_loss", grad_loss, ref);
  if (reduction == at::Reduction::None) {
    check_shape(op, "grad_loss (reduction none)", grad_loss, {rows});
  } else {
    check_shape(op, "grad_loss (a reduced loss)", grad_loss, {});
  }
}

// The outputs of cross_entropy_forward that its backward reads, and grad_loss.
inline void check_cross_entropy_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& row_max, const at::Tensor& row_log_sum,
    const at::Tensor& total_weight, int64_t reduction, double label_smoothing,
    double lse_square_scale, double softcap) {
  check_cross_entropy_inputs(op, input, target, weight, reduction, label_smoothing, lse_square_scale, softcap);
  check_cross_entropy_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, input.size(0), reduction,
                                  input);
}

// A shard [class_start, class_start + columns) within [0, classes), and the
// shard backward's row_weight (rows,) and weight_sum (a scalar), floating, on
// the device of `ref`.
inline void check_shard(const char* op, int64_t rows, int64_t columns, const at::Tensor& row_weight,
                        const at::Tensor& weight_sum, int64_t class_start, int64_t classes, const at::Tensor& ref) {
  TORCH_CHECK(class_start >= 0 && classes >= 0 && class_start <= classes - columns, op,
              ": the shard's classes [class_start, class_start + ", columns, ") = [", class_start, ", ",
              class_start + columns, ") must lie within the ", classes, " classes");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"row_weight", row_weight},
                                {"weight_sum", weight_sum}}) {
    check_floating(op, name, t);
    check_device(op, name, t, ref);
  }
  // The shapes spelled out in the calls: an IntArrayRef kept in a tuple would point
  // into an initializer list that is gone by the time it is read.
  check_shape(op, "row_weight", row_weight, {rows});
  check_shape(op, "weight_sum", weight_sum, {});
}

// The arguments of cross_entropy_shard_backward: those of cross_entropy_backward
// (class indices are read by the kernels, against `classes`), a shard
// [class_start, class_start + C_local) within [0, classes), row_weight (R,) and
// weight_sum (a scalar) of row_max's dtype on the input's device.
inline void check_cross_entropy_shard_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max, const at::Tensor& row_log_sum,
    const at::Tensor& row_weight, const at::Tensor& total_weight, const at::Tensor& weight_sum,
    int64_t reduction, double label_smoothing, double lse_square_scale, double softcap, int64_t class_start,
    int64_t classes) {
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum, total_weight,
                                      reduction, label_smoothing, lse_square_scale, softcap);
  check_shard(op, input.size(0), input.size(1), row_weight, weight_sum, class_start, classes, input);
}

}  // namespace myext
