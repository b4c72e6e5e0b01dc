// Fused linear cross-entropy on CUDA: the chunk loop of linear_cross_entropy.h
// with cuBLAS GEMMs (through ATen) and the CUDA cross-entropy row kernels of
// cross_entropy.cu (cross_entropy_kernels.h): each chunk's rows forward, then,
// where gradients are wanted, their gradient written over the chunk's logits.
// Host code only (compiled as C++): the kernels it runs are cuBLAS's and
// cross_entropy.cu's. Nothing is read on the host: the mean's divisor and the
// gradients' scale stay on the device.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../linear_cross_entropy.h"
#include "cross_entropy_kernels.h"

#include <limits>
#include <optional>
#include <tuple>

namespace myext {
namespace cuda {
namespace {

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

// The mean's divisor, known before the first chunk: the summed s w_t of the
// class targets not ignored, or the summed s of the rows for probabilities
// (s the sample weights, ones if none), as the row kernels count them.
at::Tensor divisor_before(const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                          at::ScalarType acc_type) {
  const auto options = target.options().dtype(acc_type);
  const std::optional<at::Tensor> s =
      sample_weight.has_value() ? std::optional<at::Tensor>(sample_weight->to(acc_type)) : std::nullopt;
  if (target.is_floating_point()) {
    return s.has_value() ? s->sum() : at::full({}, static_cast<double>(target.size(0)), options);
  }
  const at::Tensor kept = target.ne(ignore_index);
  if (!weight.has_value() && !s.has_value()) return kept.sum().to(acc_type);
  at::Tensor row_weight;
  if (weight.has_value()) {
    const at::Tensor safe_target = at::where(kept, target, at::zeros_like(target));
    row_weight = weight->to(acc_type).index_select(0, safe_target);
    if (s.has_value()) row_weight = row_weight * *s;
  } else {
    row_weight = *s;
  }
  // After the product: an ignored row adds 0 whatever its sample weight (inf or nan too).
  return at::where(kept, row_weight, 0).sum();
}

// An optional (R,) operand in the accumulation type, contiguous: converted once
// for all chunks (each chunk's row kernels then find it so and copy nothing).
std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(acc_type).contiguous()) : std::nullopt;
}

RowExtras as_acc(const RowExtras& e, at::ScalarType acc_type) {
  return {as_acc(e.grad_logprob, acc_type), as_acc(e.grad_entropy, acc_type), as_acc(e.row_entropy, acc_type)};
}

// Rows [begin, begin + count) of an optional (R,) tensor.
std::optional<at::Tensor> rows_of(const std::optional<at::Tensor>& t, int64_t begin, int64_t count) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, begin, count)) : std::nullopt;
}

RowExtras rows_of(const RowExtras& e, int64_t begin, int64_t count) {
  return {rows_of(e.grad_logprob, begin, count), rows_of(e.grad_entropy, begin, count),
          rows_of(e.row_entropy, begin, count)};
}

// nan where the divisor is 0: a mean over no weight is nan, as in PyTorch.
at::Tensor nan_if_zero(const at::Tensor& divisor) {
  return at::where(divisor.eq(0), at::full({}, std::numeric_limits<double>::quiet_NaN(), divisor.options()),
                   divisor);
}

// The options of a chunk's rows: `o` with the rows' losses left unreduced, or
// their gradients as of a sum, which the loop reduces or scales itself.
LossOptions rows_options(const LossOptions& o, int64_t reduction) {
  LossOptions rows = o;
  rows.reduction = reduction;
  return rows;
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

// The kernels behind the ops of linear_cross_entropy.h, which has checked
// their arguments, and with them those of each chunk's rows.
struct CudaKernels {
  static LinearCrossEntropyForward forward(const char* op, const at::Tensor& input, const at::Tensor& linear_weight,
                                           const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& sample_weight, const LinearLossOptions& o,
                                           std::array<bool, 3> grad_mask) {
    const c10::cuda::CUDAGuard guard(input.device());
    const Operands p = prepare(input, linear_weight, linear_bias, target);
    const int64_t rows = p.x.size(0);
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const auto acc_options = p.x.options().dtype(acc_type);
    at::Tensor losses = at::empty({rows}, acc_options);
    at::Tensor row_max = at::empty({rows}, acc_options);
    at::Tensor row_log_sum = at::empty({rows}, acc_options);
    at::Tensor target_logit = at::empty({rows}, acc_options);
    // (0,) where not asked, as cross_entropy_forward's.
    at::Tensor row_entropy = at::empty({o.entropy ? rows : 0}, acc_options);
    const std::optional<at::Tensor> sample_weight_acc = as_acc(sample_weight, acc_type);
    const at::Tensor total_weight = divisor_before(p.target, weight, sample_weight_acc, o.ignore_index, acc_type);
    const bool grads = o.reduction != at::Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
    LinearGrads g =
        grads ? make_linear_grads(p.x, p.w, grad_mask, weight_grad_dtype(o, p.x.scalar_type())) : LinearGrads{};
    const at::Tensor grad_scale = o.reduction == at::Reduction::Mean ? nan_if_zero(total_weight).reciprocal()
                                                                     : at::ones({}, acc_options);
    const LossOptions unreduced = rows_options(o, at::Reduction::None);
    // As a sum scaled by grad_scale: the in-place backward multiplies by its grad_loss.
    const LossOptions summed = rows_options(o, at::Reduction::Sum);
    const int64_t chunk = chunk_rows(rows, p.w.size(0), p.x.element_size(), o.chunk_size);
    for_each_chunk(p.x, p.w, p.b, chunk, grads, g, CudaGemms{},
                   [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                     const at::Tensor t = p.target.narrow(0, begin, count);
                     const std::optional<at::Tensor> chunk_sample_weight = rows_of(sample_weight_acc, begin, count);
                     auto [chunk_loss, chunk_max, chunk_log_sum, chunk_target_logit, chunk_weight, chunk_entropy] =
                         CrossEntropyKernels::forward(op, logits, t, weight, chunk_sample_weight, unreduced);
                     losses.narrow(0, begin, count).copy_(chunk_loss);
                     row_max.narrow(0, begin, count).copy_(chunk_max);
                     row_log_sum.narrow(0, begin, count).copy_(chunk_log_sum);
                     target_logit.narrow(0, begin, count).copy_(chunk_target_logit);
                     if (o.entropy) row_entropy.narrow(0, begin, count).copy_(chunk_entropy);
                     if (grads) {
                       // Each row's gradient times its sample weight, over the divisor of them all.
                       at::Tensor grad_logits = logits;
                       CrossEntropyKernels::backward_inplace(op, grad_scale, grad_logits, t, weight,
                                                             chunk_sample_weight, chunk_max, chunk_log_sum,
                                                             chunk_weight, RowExtras{}, summed, nullptr);
                     }
                   });
    at::Tensor loss;
    if (o.reduction == at::Reduction::None) {
      loss = losses.to(p.x.scalar_type());
    } else if (o.reduction == at::Reduction::Sum) {
      loss = losses.sum().to(p.x.scalar_type());
    } else {
      loss = losses.sum().div(nan_if_zero(total_weight)).to(p.x.scalar_type());
    }
    const LinearGradOutputs out = grads ? finish(g, p.x.scalar_type()) : LinearGradOutputs{};
    return {loss, row_max, row_log_sum, target_logit, total_weight, row_entropy, std::get<0>(out),
            std::get<1>(out), std::get<2>(out)};
  }

  // The backward chunk loop: each chunk's logits again, their gradient written
  // over them (of a shard of the classes, with `shard`). weight_sum and
  // total_weight stay on the device, where the row kernels read them.
  static LinearGradOutputs backward(const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
                                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                                    const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                                    const RowExtras& extras, const LinearLossOptions& o,
                                    std::array<bool, 3> output_mask, const ClassShard* shard) {
    if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {};
    const c10::cuda::CUDAGuard guard(input.device());
    const Operands p = prepare(input, linear_weight, linear_bias, target);
    LinearGrads g = make_linear_grads(p.x, p.w, output_mask, weight_grad_dtype(o, p.x.scalar_type()));
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const std::optional<at::Tensor> sample_weight_acc = as_acc(sample_weight, acc_type);
    const RowExtras extras_acc = as_acc(extras, acc_type);
    const int64_t chunk = chunk_rows(p.x.size(0), p.w.size(0), p.x.element_size(), o.chunk_size);
    for_each_chunk(p.x, p.w, p.b, chunk, true, g, CudaGemms{},
                   [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                     at::Tensor grad_logits = logits;
                     const at::Tensor chunk_grad_loss =
                         o.reduction == at::Reduction::None ? grad_loss.narrow(0, begin, count) : grad_loss;
                     std::optional<ClassShard> chunk_shard;
                     if (shard != nullptr) {
                       chunk_shard = ClassShard{shard->row_weight.narrow(0, begin, count), shard->weight_sum,
                                                shard->class_start, shard->classes};
                     }
                     // The chunk's rows of every per-row operand: sample weights and extras too.
                     CrossEntropyKernels::backward_inplace(
                         op, chunk_grad_loss, grad_logits, p.target.narrow(0, begin, count), weight,
                         rows_of(sample_weight_acc, begin, count), row_max.narrow(0, begin, count),
                         row_log_sum.narrow(0, begin, count), total_weight, rows_of(extras_acc, begin, count), o,
                         chunk_shard ? &*chunk_shard : nullptr);
                   });
    return finish(g, p.x.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(myext, CUDA, m) { register_linear_cross_entropy_ops<CudaKernels>(m); }

}  // namespace cuda
}  // namespace myext
