// The cross-entropy ops on the CPU, behind the checks of cross_entropy.h: the
// class indices' check, layout and reduction around the row kernels of
// cross_entropy_rows.h. Rows are split across threads; the loss is reduced
// serially in double, so that it does not depend on the number of threads.
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

// The kernels behind the ops of cross_entropy.h, which has checked their arguments.
struct CpuKernels {
  static CrossEntropyForward forward(const char* op, const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& sample_weight, const LossOptions& o) {
    const Prepared p = prepare(op, input, target, weight, o.ignore_index);
    const int64_t rows = p.x.size(0);
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const auto acc_options = p.x.options().dtype(acc_type);
    at::Tensor row_max = at::empty({rows}, acc_options);
    at::Tensor row_log_sum = at::empty({rows}, acc_options);
    at::Tensor target_logit = at::empty({rows}, acc_options);
    at::Tensor total_weight = at::empty({}, acc_options);
    at::Tensor row_entropy = at::empty({o.entropy ? rows : 0}, acc_options);
    const at::Tensor row_sample_weight = ce::rows_in(sample_weight, acc_type);
    at::Tensor loss = at::empty(o.reduction == at::Reduction::None ? at::IntArrayRef{rows}
                                                                   : at::IntArrayRef{},
                                p.x.options());

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_forward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<double> losses(rows), weights(rows);
          ce::forward(rows_of<scalar_t>(p), p.weight,
                      row_sample_weight.defined() ? row_sample_weight.data_ptr<acc_t>() : nullptr, o,
                      ce::ForwardOut<acc_t>{losses.data(), row_max.data_ptr<acc_t>(), row_log_sum.data_ptr<acc_t>(),
                                            target_logit.data_ptr<acc_t>(), weights.data(),
                                            o.entropy ? row_entropy.data_ptr<acc_t>() : nullptr});
          ce::reduce_rows<scalar_t>(losses, weights, o.reduction, loss, total_weight);
        });
    return {loss, row_max, row_log_sum, target_logit, total_weight, row_entropy};
  }

  static at::Tensor backward(const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
                             const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                             const at::Tensor& row_log_sum, const at::Tensor& total_weight, const RowExtras& extras,
                             const LossOptions& o, const ClassShard* shard) {
    const Prepared p = prepare(op, input, target, weight, o.ignore_index, shard != nullptr ? shard->classes : -1);
    at::Tensor grad_input = empty_large(p.x.sizes(), p.x.options());
    backward_into(grad_input, p, grad_loss, sample_weight, row_max, row_log_sum, total_weight, extras, o, shard);
    return grad_input;
  }

  static void backward_inplace(const char* op, const at::Tensor& grad_loss, at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                               const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                               const RowExtras& extras, const LossOptions& o, const ClassShard* shard) {
    const Prepared p = prepare(op, input, target, weight, o.ignore_index, shard != nullptr ? shard->classes : -1);
    backward_into(input, p, grad_loss, sample_weight, row_max, row_log_sum, total_weight, extras, o, shard);
  }

  // Writes the gradient of the loss (and of the extras' terms) w.r.t. the logits
  // `p.x` into `grad_input`, which may be `p.x` itself; with `shard`, of the loss
  // over every class w.r.t. the shard's.
  static void backward_into(at::Tensor& grad_input, const Prepared& p, const at::Tensor& grad_loss,
                            const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                            const at::Tensor& row_log_sum, const at::Tensor& total_weight, const RowExtras& extras,
                            const LossOptions& o, const ClassShard* shard) {
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const ce::BackwardInputs b =
        ce::backward_inputs(grad_loss, row_max, row_log_sum, total_weight, o.reduction, acc_type, sample_weight,
                            extras.grad_logprob, extras.grad_entropy, extras.row_entropy);
    const at::Tensor row_weight = shard != nullptr ? shard->row_weight.to(acc_type).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          std::optional<ce::Shard<acc_t>> rows_shard;
          if (shard != nullptr) {
            rows_shard = ce::Shard<acc_t>{shard->class_start, shard->classes, shard->weight_sum.item<double>(),
                                          row_weight.data_ptr<acc_t>()};
          }
          ce::backward(rows_of<scalar_t>(p), grad_input.data_ptr<scalar_t>(), p.weight, b.row_max.data_ptr<acc_t>(),
                       b.row_log_sum.data_ptr<acc_t>(),
                       b.row_scale.defined() ? b.row_scale.data_ptr<acc_t>() : nullptr, b.common_scale, o,
                       b.factors<acc_t>(), rows_shard ? &*rows_shard : nullptr);
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) { register_cross_entropy_ops<CpuKernels>(m); }

}  // namespace myext
