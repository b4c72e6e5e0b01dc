// Fused linear cross-entropy on CUDA: the chunk loop of linear_cross_entropy.h
// with cuBLAS GEMMs (through ATen) and the CUDA cross-entropy row kernels of
// cross_entropy.cu, reached through their dispatcher ops: each chunk's rows
// forward, then, where gradients are wanted, their gradient written over the
// chunk's logits by the in-place backward op (for a shard of the classes, by
// a host function of cross_entropy.cu). Host code only (compiled as C++):
// the kernels it runs are cuBLAS's and cross_entropy.cu's. Nothing is read on
// the host: the mean's divisor and the gradients' scale stay on the device.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../linear_cross_entropy.h"

#include <limits>
#include <optional>
#include <tuple>

namespace myext {
namespace cuda {

// Defined in cross_entropy.cu.
void cross_entropy_shard_backward_inplace(
    const at::Tensor& grad_loss, at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max, const at::Tensor& row_log_sum,
    const at::Tensor& row_weight, const at::Tensor& total_weight, const at::Tensor& weight_sum, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap, int64_t class_start,
    int64_t classes);

namespace {

using ForwardRows = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double, double,
    double);
using BackwardRowsInPlace = void(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, int64_t, int64_t, double, double, double);

const c10::TypedOperatorHandle<ForwardRows>& forward_rows() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("myext::cross_entropy_forward", "")
                                 .typed<ForwardRows>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardRowsInPlace>& backward_rows_in_place() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("myext::cross_entropy_backward_", "")
                                 .typed<BackwardRowsInPlace>();
  return handle;
}

struct CudaGemms {
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  }

  void input_grad(const at::Tensor& d, const at::Tensor& w, at::Tensor out) const { at::mm_out(out, d, w); }

  void add_weight_grad(at::Tensor& acc, const at::Tensor& d, const at::Tensor& x) const {
    if (acc.scalar_type() == d.scalar_type()) {
      acc.addmm_(d.t(), x);
    } else {
      // add_ on a CUDA tensor widens the bfloat16 product as it reads it.
      add_weight_grad_blocked(
          acc, d, x, [](const at::Tensor& block, const at::Tensor& rows) { return block.t().mm(rows); },
          [](at::Tensor& acc_block, const at::Tensor& product) { acc_block.add_(product); });
    }
  }
};

// The mean's divisor, known before the first chunk: the summed weights of the
// class targets not ignored, or the number of rows for probabilities.
at::Tensor divisor_before(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
                          at::ScalarType acc_type) {
  const auto options = target.options().dtype(acc_type);
  if (target.is_floating_point()) return at::full({}, static_cast<double>(target.size(0)), options);
  const at::Tensor kept = target.ne(ignore_index);
  if (!weight.has_value()) return kept.sum().to(acc_type);
  const at::Tensor safe_target = at::where(kept, target, at::zeros_like(target));
  return at::where(kept, weight->to(acc_type).index_select(0, safe_target), 0).sum();
}

// nan where the divisor is 0: a mean over no weight is nan, as in PyTorch.
at::Tensor nan_if_zero(const at::Tensor& divisor) {
  return at::where(divisor.eq(0), at::full({}, std::numeric_limits<double>::quiet_NaN(), divisor.options()),
                   divisor);
}

struct Operands {
  at::Tensor x, w;
  std::optional<at::Tensor> b;
  at::Tensor target;
};

Operands prepare(const at::Tensor& input, const at::Tensor& linear_weight,
                 const std::optional<at::Tensor>& linear_bias, const at::Tensor& target) {
  return {input.contiguous(), linear_weight.contiguous(),
          linear_bias.has_value() ? std::optional<at::Tensor>(linear_bias->contiguous()) : std::nullopt,
          target.contiguous()};
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>>
linear_cross_entropy_forward_cuda(const at::Tensor& input, const at::Tensor& linear_weight,
                                  const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                                  double label_smoothing, double lse_square_scale, double softcap,
                                  int64_t chunk_size, std::array<bool, 3> grad_mask) {
  constexpr const char* op = "linear_cross_entropy_forward";
  check_linear_cross_entropy_inputs(op, input, linear_weight, linear_bias, target, weight, reduction,
                                    label_smoothing, lse_square_scale, softcap, chunk_size);
  const c10::cuda::CUDAGuard guard(input.device());
  const Operands p = prepare(input, linear_weight, linear_bias, target);
  const int64_t rows = p.x.size(0);
  const auto acc_type = at::toOpMathType(p.x.scalar_type());
  const auto acc_options = p.x.options().dtype(acc_type);
  at::Tensor losses = at::empty({rows}, acc_options);
  at::Tensor row_max = at::empty({rows}, acc_options);
  at::Tensor row_log_sum = at::empty({rows}, acc_options);
  at::Tensor target_logit = at::empty({rows}, acc_options);
  const at::Tensor total_weight = divisor_before(p.target, weight, ignore_index, acc_type);
  const bool grads = reduction != at::Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  LinearGrads g = grads ? make_linear_grads(p.x, p.w, grad_mask) : LinearGrads{};
  const at::Tensor grad_scale = reduction == at::Reduction::Mean ? nan_if_zero(total_weight).reciprocal()
                                                                 : at::ones({}, acc_options);
  const int64_t chunk = chunk_rows(rows, p.w.size(0), p.x.element_size(), chunk_size);
  for_each_chunk(p.x, p.w, p.b, chunk, grads, g, CudaGemms{},
                 [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                   const at::Tensor t = p.target.narrow(0, begin, count);
                   auto [chunk_loss, chunk_max, chunk_log_sum, chunk_target_logit, chunk_weight] =
                       forward_rows().call(logits, t, weight, at::Reduction::None, ignore_index, label_smoothing,
                                           lse_square_scale, softcap);
                   losses.narrow(0, begin, count).copy_(chunk_loss);
                   row_max.narrow(0, begin, count).copy_(chunk_max);
                   row_log_sum.narrow(0, begin, count).copy_(chunk_log_sum);
                   target_logit.narrow(0, begin, count).copy_(chunk_target_logit);
                   if (grads) {
                     // As a sum scaled by grad_scale: the in-place op multiplies by grad_loss.
                     at::Tensor grad_logits = logits;
                     backward_rows_in_place().call(grad_scale, grad_logits, t, weight, chunk_max, chunk_log_sum,
                                                   chunk_weight, at::Reduction::Sum, ignore_index, label_smoothing,
                                                   lse_square_scale, softcap);
                   }
                 });
  at::Tensor loss;
  if (reduction == at::Reduction::None) {
    loss = losses.to(p.x.scalar_type());
  } else if (reduction == at::Reduction::Sum) {
    loss = losses.sum().to(p.x.scalar_type());
  } else {
    loss = losses.sum().div(nan_if_zero(total_weight)).to(p.x.scalar_type());
  }
  const Grads out = grads ? finish(g, p.x.scalar_type()) : Grads{};
  return {loss, row_max, row_log_sum, target_logit, total_weight, std::get<0>(out), std::get<1>(out),
          std::get<2>(out)};
}

// A shard of the classes, as linear_cross_entropy_shard_backward gives it.
struct ShardArgs {
  const at::Tensor& row_weight;
  const at::Tensor& weight_sum;
  int64_t class_start;
  int64_t classes;
};

// The backward chunk loop: each chunk's logits again, their gradient written
// over them (of a shard of the classes, with `shard`).
Grads backward_chunks(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& linear_weight,
                      const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
                      const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
                      int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap,
                      int64_t chunk_size, std::array<bool, 3> output_mask, const ShardArgs* shard) {
  if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {};
  const c10::cuda::CUDAGuard guard(input.device());
  const Operands p = prepare(input, linear_weight, linear_bias, target);
  LinearGrads g = make_linear_grads(p.x, p.w, output_mask);
  const int64_t chunk = chunk_rows(p.x.size(0), p.w.size(0), p.x.element_size(), chunk_size);
  for_each_chunk(p.x, p.w, p.b, chunk, true, g, CudaGemms{},
                 [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                   at::Tensor grad_logits = logits;
                   const at::Tensor chunk_grad_loss =
                       reduction == at::Reduction::None ? grad_loss.narrow(0, begin, count) : grad_loss;
                   const at::Tensor t = p.target.narrow(0, begin, count);
                   const at::Tensor chunk_max = row_max.narrow(0, begin, count);
                   const at::Tensor chunk_log_sum = row_log_sum.narrow(0, begin, count);
                   if (shard == nullptr) {
                     backward_rows_in_place().call(chunk_grad_loss, grad_logits, t, weight, chunk_max, chunk_log_sum,
                                                   total_weight, reduction, ignore_index, label_smoothing,
                                                   lse_square_scale, softcap);
                   } else {
                     cross_entropy_shard_backward_inplace(
                         chunk_grad_loss, grad_logits, t, weight, chunk_max, chunk_log_sum,
                         shard->row_weight.narrow(0, begin, count), total_weight, shard->weight_sum, reduction,
                         ignore_index, label_smoothing, lse_square_scale, softcap, shard->class_start, shard->classes);
                   }
                 });
  return finish(g, p.x.scalar_type());
}

Grads linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& linear_weight,
    const std::optional<at::Tensor>& linear_bias, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& row_max, const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_cross_entropy_backward";
  check_linear_cross_entropy_backward_inputs(op, grad_loss, input, linear_weight, linear_bias, target, weight,
                                             row_max, row_log_sum, total_weight, reduction, label_smoothing,
                                             lse_square_scale, softcap, chunk_size);
  return backward_chunks(grad_loss, input, linear_weight, linear_bias, target, weight, row_max, row_log_sum,
                         total_weight, reduction, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
                         output_mask, nullptr);
}

// weight_sum and total_weight stay on the device, where the row kernels read them.
Grads linear_cross_entropy_shard_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& linear_weight,
    const std::optional<at::Tensor>& linear_bias, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& row_max, const at::Tensor& row_log_sum, const at::Tensor& row_weight,
    const at::Tensor& total_weight, const at::Tensor& weight_sum, int64_t reduction, int64_t ignore_index,
    double label_smoothing, double lse_square_scale, double softcap, int64_t class_start, int64_t classes,
    int64_t chunk_size, std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_cross_entropy_shard_backward";
  check_linear_cross_entropy_shard_backward_inputs(op, grad_loss, input, linear_weight, linear_bias, target, weight,
                                                   row_max, row_log_sum, row_weight, total_weight, weight_sum,
                                                   reduction, label_smoothing, lse_square_scale, softcap,
                                                   class_start, classes, chunk_size);
  const ShardArgs shard{row_weight, weight_sum, class_start, classes};
  return backward_chunks(grad_loss, input, linear_weight, linear_bias, target, weight, row_max, row_log_sum,
                         total_weight, reduction, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
                         output_mask, &shard);
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CUDA, m) {
  m.impl("linear_cross_entropy_forward", &linear_cross_entropy_forward_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
  m.impl("linear_cross_entropy_shard_backward", &linear_cross_entropy_shard_backward_cuda);
}

}  // namespace cuda
}  // namespace myext
