// The cross-entropy ops on the CPU: argument checks, layout and reduction
// around the row kernels of cross_entropy_rows.h. Rows are split across
// threads; the loss is reduced serially in double, so that it does not depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../cross_entropy.h"
#include "cross_entropy_rows.h"
#include "large_alloc.h"

#include <cmath>
#include <vector>

namespace myext {
namespace {

// The operands in the layout the kernels read.
struct Prepared {
  at::Tensor x;       // (R, C) contiguous
  at::Tensor target;  // (R,) int64 or (R, C) contiguous
  at::Tensor weight;  // (C,), or undefined
  bool class_targets;
};

// Lays out checked arguments for the kernels, and checks the class indices
// (the op is public) before any kernel reads with them.
// Class indices are checked against `classes`: the row's, or with a shard of
// them every class's.
Prepared prepare(const char* op, const at::Tensor& input, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, int64_t classes = -1) {
  Prepared p{input.contiguous(), target.contiguous(), weight.has_value() ? *weight : at::Tensor(),
             !target.is_floating_point()};
  if (p.class_targets) {
    ce::check_class_indices(op, p.target.data_ptr<int64_t>(), p.target.numel(),
                            classes < 0 ? input.size(1) : classes, ignore_index);
  }
  return p;
}

template <typename scalar_t>
ce::Rows<scalar_t> rows_of(const Prepared& p) {
  return {p.x.data_ptr<scalar_t>(), p.x.size(0), p.x.size(1),
          p.class_targets ? p.target.data_ptr<int64_t>() : nullptr,
          p.class_targets ? nullptr : p.target.data_ptr<scalar_t>()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double lse_square_scale,
    double softcap) {
  constexpr const char* op = "cross_entropy_forward";
  check_cross_entropy_inputs(op, input, target, weight, reduction, label_smoothing, lse_square_scale, softcap);
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  const int64_t rows = p.x.size(0);
  const auto acc_options = p.x.options().dtype(at::toOpMathType(p.x.scalar_type()));
  at::Tensor row_max = at::empty({rows}, acc_options);
  at::Tensor row_log_sum = at::empty({rows}, acc_options);
  at::Tensor target_logit = at::empty({rows}, acc_options);
  at::Tensor total_weight = at::empty({}, acc_options);
  at::Tensor loss = at::empty(reduction == at::Reduction::None ? at::IntArrayRef{rows}
                                                               : at::IntArrayRef{},
                              p.x.options());
  const ce::Settings settings{ignore_index, label_smoothing, lse_square_scale, softcap};

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<double> losses(rows), weights(rows);
        ce::forward(rows_of<scalar_t>(p), p.weight, settings,
                    ce::ForwardOut<acc_t>{losses.data(), row_max.data_ptr<acc_t>(), row_log_sum.data_ptr<acc_t>(),
                                          target_logit.data_ptr<acc_t>(), weights.data()});
        ce::reduce_rows<scalar_t>(losses, weights, reduction, loss, total_weight);
      });
  return {loss, row_max, row_log_sum, target_logit, total_weight};
}

// Writes the gradient of the loss w.r.t. the logits `p.x` into `grad_input`,
// which may be `p.x` itself.
void backward_into(at::Tensor& grad_input, const Prepared& p, const at::Tensor& grad_loss,
                   const at::Tensor& row_max, const at::Tensor& row_log_sum,
                   const at::Tensor& total_weight, int64_t reduction, const ce::Settings& settings) {
  const auto acc_type = at::toOpMathType(p.x.scalar_type());
  const ce::BackwardInputs b = ce::backward_inputs(grad_loss, row_max, row_log_sum, total_weight, reduction, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        ce::backward(rows_of<scalar_t>(p), grad_input.data_ptr<scalar_t>(), p.weight, b.row_max.data_ptr<acc_t>(),
                     b.row_log_sum.data_ptr<acc_t>(), b.row_scale.defined() ? b.row_scale.data_ptr<acc_t>() : nullptr,
                     b.common_scale, settings);
      });
}

at::Tensor cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap) {
  constexpr const char* op = "cross_entropy_backward";
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum,
                                      total_weight, reduction, label_smoothing, lse_square_scale, softcap);
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  at::Tensor grad_input = empty_large(p.x.sizes(), p.x.options());
  backward_into(grad_input, p, grad_loss, row_max, row_log_sum, total_weight, reduction,
                {ignore_index, label_smoothing, lse_square_scale, softcap});
  return grad_input;
}

void cross_entropy_backward_inplace_cpu(
    const at::Tensor& grad_loss, at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap) {
  constexpr const char* op = "cross_entropy_backward_";
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum,
                                      total_weight, reduction, label_smoothing, lse_square_scale, softcap);
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous");
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  backward_into(input, p, grad_loss, row_max, row_log_sum, total_weight, reduction,
                {ignore_index, label_smoothing, lse_square_scale, softcap});
}

at::Tensor cross_entropy_shard_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max, const at::Tensor& row_log_sum,
    const at::Tensor& row_weight, const at::Tensor& total_weight, const at::Tensor& weight_sum, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap, int64_t class_start,
    int64_t classes) {
  constexpr const char* op = "cross_entropy_shard_backward";
  check_cross_entropy_shard_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum, row_weight,
                                            total_weight, weight_sum, reduction, label_smoothing, lse_square_scale,
                                            softcap, class_start, classes);
  const Prepared p = prepare(op, input, target, weight, ignore_index, classes);
  const auto acc_type = at::toOpMathType(p.x.scalar_type());
  const ce::BackwardInputs b = ce::backward_inputs(grad_loss, row_max, row_log_sum, total_weight, reduction, acc_type);
  const at::Tensor row_weight_acc = row_weight.to(acc_type).contiguous();
  at::Tensor grad_input = empty_large(p.x.sizes(), p.x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_shard_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ce::Shard<acc_t> shard{class_start, classes, weight_sum.item<double>(),
                                     row_weight_acc.data_ptr<acc_t>()};
        ce::backward(rows_of<scalar_t>(p), grad_input.data_ptr<scalar_t>(), p.weight, b.row_max.data_ptr<acc_t>(),
                     b.row_log_sum.data_ptr<acc_t>(), b.row_scale.defined() ? b.row_scale.data_ptr<acc_t>() : nullptr,
                     b.common_scale, {ignore_index, label_smoothing, lse_square_scale, softcap}, &shard);
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_inplace_cpu);
  m.impl("cross_entropy_shard_backward", &cross_entropy_shard_backward_cpu);
}

}  // namespace myext
