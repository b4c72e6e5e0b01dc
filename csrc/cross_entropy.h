// The cross-entropy ops as their schemas (myext.cpp) give them, over the
// kernels of a device: their argument checks, and the one function per op
// that gathers its options into a LossOptions and checks every argument
// before the device's kernel runs (register_cross_entropy_ops).
#pragma once

#include <torch/library.h>

#include "checks.h"
#include "loss_options.h"

#include <cmath>
#include <tuple>

namespace myext {

// The options: the reduction code, label smoothing in [0, 1], the z-loss scale
// and the soft cap (0: none), both finite and >= 0, the temperature finite and
// > 0. Any ignore_index is valid.
inline void check_cross_entropy_options(const char* op, const LossOptions& o) {
  check_reduction(op, o.reduction);
  check_unit_interval(op, "label_smoothing", o.label_smoothing);
  TORCH_CHECK(std::isfinite(o.lse_square_scale) && o.lse_square_scale >= 0, op,
              ": lse_square_scale must be finite and >= 0, got ", o.lse_square_scale);
  TORCH_CHECK(std::isfinite(o.softcap) && o.softcap >= 0, op,
              ": softcap must be finite and > 0, or 0 for none, got ", o.softcap);
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature > 0, op,
              ": temperature must be finite and > 0, got ", o.temperature);
}

// `t`, where given, is a floating vector of `rows` on `ref`'s device (any
// floating dtype: the kernels read it in their accumulation type).
inline void check_optional_rows(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                int64_t rows, const at::Tensor& ref) {
  if (!t.has_value()) return;
  check_floating(op, name, *t);
  check_device(op, name, *t, ref);
  check_shape(op, name, *t, {rows});
}

// The upstream gradients of each row's log-probability of its target and of
// its entropy, and forward's row_entropy, which the entropy's gradient reads.
struct RowExtras {
  std::optional<at::Tensor> grad_logprob;
  std::optional<at::Tensor> grad_entropy;
  std::optional<at::Tensor> row_entropy;
};

// The extras of `rows` rows: each a vector of them; row_entropy given exactly
// where grad_entropy is, and grad_logprob only for class-index targets (a
// target of probabilities has no one target class).
inline void check_row_extras(const char* op, const RowExtras& e, const at::Tensor& target, int64_t rows,
                             const at::Tensor& ref) {
  check_optional_rows(op, "grad_logprob", e.grad_logprob, rows, ref);
  check_optional_rows(op, "grad_entropy", e.grad_entropy, rows, ref);
  check_optional_rows(op, "row_entropy", e.row_entropy, rows, ref);
  TORCH_CHECK(e.grad_entropy.has_value() == e.row_entropy.has_value(), op,
              ": grad_entropy needs forward's row_entropy and row_entropy is read only with grad_entropy; got ",
              e.grad_entropy.has_value() ? "grad_entropy without row_entropy" : "row_entropy without grad_entropy");
  TORCH_CHECK(!e.grad_logprob.has_value() || !target.is_floating_point(), op,
              ": grad_logprob needs class-index targets: a target of probabilities has no one target class");
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

// input (R, C) logits, and targets, class weights and sample weights for them.
inline void check_cross_entropy_inputs(const char* op, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& sample_weight,
                                       const LossOptions& o) {
  check_floating(op, "input", input);
  check_dim(op, "input", input, 2);
  check_cross_entropy_targets(op, target, weight, input.size(0), input.size(1), input);
  check_optional_rows(op, "sample_weight", sample_weight, input.size(0), input);
  check_cross_entropy_options(op, o);
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

// The outputs of cross_entropy_forward that its backward reads, grad_loss and
// the extras.
inline void check_cross_entropy_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max, const at::Tensor& row_log_sum,
    const at::Tensor& total_weight, const RowExtras& extras, const LossOptions& o) {
  check_cross_entropy_inputs(op, input, target, weight, sample_weight, o);
  check_cross_entropy_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, input.size(0), o.reduction,
                                  input);
  check_row_extras(op, extras, target, input.size(0), input);
}

// Rows that hold a shard of the classes (vocabulary parallelism), classes
// [class_start, class_start + columns) of `classes`: row_weight (R,) is each
// row's sum(w q) over every class (q the target after label smoothing), and
// weight_sum (a scalar) the sum of every class's weight (C without weights).
struct ClassShard {
  at::Tensor row_weight;
  at::Tensor weight_sum;
  int64_t class_start;
  int64_t classes;
};

// A shard within [0, classes) of `columns` classes, and its row_weight (rows,)
// and weight_sum (a scalar), floating, on the device of `ref`.
inline void check_shard(const char* op, int64_t rows, int64_t columns, const ClassShard& shard,
                        const at::Tensor& ref) {
  const int64_t class_start = shard.class_start;
  const int64_t classes = shard.classes;
  TORCH_CHECK(class_start >= 0 && classes >= 0 && class_start <= classes - columns, op,
              ": the shard's classes [class_start, class_start + ", columns, ") = [", class_start, ", ",
              class_start + columns, ") must lie within the ", classes, " classes");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"row_weight", shard.row_weight},
                                {"weight_sum", shard.weight_sum}}) {
    check_floating(op, name, t);
    check_device(op, name, t, ref);
  }
  // The shapes spelled out in the calls: an IntArrayRef kept in a tuple would point
  // into an initializer list that is gone by the time it is read.
  check_shape(op, "row_weight", shard.row_weight, {rows});
  check_shape(op, "weight_sum", shard.weight_sum, {});
}

// The arguments of cross_entropy_shard_backward: those of cross_entropy_backward
// (class indices are read by the kernels, against the shard's `classes`) and
// the shard's, whose columns are the input's.
inline void check_cross_entropy_shard_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sample_weight,
    const at::Tensor& row_max, const at::Tensor& row_log_sum, const at::Tensor& total_weight,
    const RowExtras& extras, const ClassShard& shard, const LossOptions& o) {
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                                      total_weight, extras, o);
  check_shard(op, input.size(0), input.size(1), shard, input);
}

using CrossEntropyForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops' schema signatures over a device's `Kernels`, which take the
// arguments checked and the options whole:
//   CrossEntropyForward forward(op, input, target, weight, sample_weight, options)
//   at::Tensor backward(op, grad_loss, input, target, weight, sample_weight, row_max,
//                       row_log_sum, total_weight, extras, options, shard)
//   void backward_inplace(op, grad_loss, input, ...as backward's)
// where `shard` (a const ClassShard*) is null but for the shard's backward,
// and backward_inplace writes the gradient over `input`, contiguous.
// The ops are public (torch.ops.myext.*): each checks every argument here,
// before any kernel reads them.
template <typename Kernels>
struct CrossEntropyOps {
  static CrossEntropyForward forward(const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& sample_weight, int64_t reduction,
                                     int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                     double softcap, double temperature, bool entropy) {
    constexpr const char* op = "cross_entropy_forward";
    const LossOptions o{reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy};
    check_cross_entropy_inputs(op, input, target, weight, sample_weight, o);
    return Kernels::forward(op, input, target, weight, sample_weight, o);
  }

  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sample_weight,
                             const at::Tensor& row_max, const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                             const std::optional<at::Tensor>& grad_logprob,
                             const std::optional<at::Tensor>& grad_entropy,
                             const std::optional<at::Tensor>& row_entropy, int64_t reduction, int64_t ignore_index,
                             double label_smoothing, double lse_square_scale, double softcap, double temperature,
                             bool entropy) {
    constexpr const char* op = "cross_entropy_backward";
    const LossOptions o{reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy};
    const RowExtras extras{grad_logprob, grad_entropy, row_entropy};
    check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                                        total_weight, extras, o);
    return Kernels::backward(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum, total_weight,
                             extras, o, nullptr);
  }

  static void backward_inplace(const at::Tensor& grad_loss, at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                               const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                               const std::optional<at::Tensor>& grad_logprob,
                               const std::optional<at::Tensor>& grad_entropy,
                               const std::optional<at::Tensor>& row_entropy, int64_t reduction,
                               int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap,
                               double temperature, bool entropy) {
    constexpr const char* op = "cross_entropy_backward_";
    const LossOptions o{reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy};
    const RowExtras extras{grad_logprob, grad_entropy, row_entropy};
    check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                                        total_weight, extras, o);
    // A kernel would lay other logits out in a copy, and the gradient would land there.
    TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous");
    Kernels::backward_inplace(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                              total_weight, extras, o, nullptr);
  }

  static at::Tensor shard_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                                   const at::Tensor& row_log_sum, const at::Tensor& row_weight,
                                   const at::Tensor& total_weight, const at::Tensor& weight_sum,
                                   const std::optional<at::Tensor>& grad_logprob,
                                   const std::optional<at::Tensor>& grad_entropy,
                                   const std::optional<at::Tensor>& row_entropy, int64_t reduction,
                                   int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                   double softcap, double temperature, bool entropy, int64_t class_start,
                                   int64_t classes) {
    constexpr const char* op = "cross_entropy_shard_backward";
    const LossOptions o{reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy};
    const RowExtras extras{grad_logprob, grad_entropy, row_entropy};
    const ClassShard shard{row_weight, weight_sum, class_start, classes};
    check_cross_entropy_shard_backward_inputs(op, grad_loss, input, target, weight, sample_weight, row_max,
                                              row_log_sum, total_weight, extras, shard, o);
    return Kernels::backward(op, grad_loss, input, target, weight, sample_weight, row_max, row_log_sum, total_weight,
                             extras, o, &shard);
  }
};

// Registers the cross-entropy ops for the dispatch key of the library `m`.
template <typename Kernels>
void register_cross_entropy_ops(torch::Library& m) {
  m.impl("cross_entropy_forward", &CrossEntropyOps<Kernels>::forward);
  m.impl("cross_entropy_backward", &CrossEntropyOps<Kernels>::backward);
  m.impl("cross_entropy_backward_", &CrossEntropyOps<Kernels>::backward_inplace);
  m.impl("cross_entropy_shard_backward", &CrossEntropyOps<Kernels>::shard_backward);
}

}  // namespace myext
