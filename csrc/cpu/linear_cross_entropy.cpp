// Fused linear cross-entropy on the CPU: the chunk loop of
// linear_cross_entropy.h with the GEMMs of gemm.h (oneDNN or ATen's BLAS,
// whichever this CPU runs faster) and the row kernels of cross_entropy_rows.h,
// which read each chunk's logits and, where gradients are wanted, write their
// gradient over them.
// Per-row losses are reduced serially in double, as cross_entropy's are, so
// the loss depends on neither the thread count nor the chunk size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../linear_cross_entropy.h"
#include "cross_entropy_rows.h"
#include "gemm.h"

#include <cmath>
#include <vector>

namespace myext {
namespace {

struct CpuGemms {
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    if (cpu::use_onednn(x, w.t())) return cpu::onednn_linear(x, w, b);
    return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  }

  void input_grad(const at::Tensor& d, const at::Tensor& w, at::Tensor out) const {
    if (cpu::use_onednn(d, w)) {
      out.copy_(cpu::onednn_linear(d, w.t(), std::nullopt));
    } else {
      at::mm_out(out, d, w);
    }
  }

  void add_weight_grad(at::Tensor& acc, const at::Tensor& d, const at::Tensor& x) const {
    if (cpu::use_onednn(d.narrow(1, 0, std::min(kWeightGradBlock, d.size(1))).t(), x)) {
      // oneDNN's matmul has no accumulating form here: a block's product, then an add.
      add_weight_grad_blocked(
          acc, d, x,
          [](const at::Tensor& block, const at::Tensor& rows) {
            return cpu::onednn_linear(block.t(), rows.t(), std::nullopt);
          },
          add_widened);
    } else if (acc.scalar_type() == d.scalar_type()) {
      acc.addmm_(d.t(), x);
    } else {
      add_weight_grad_blocked(
          acc, d, x, [](const at::Tensor& block, const at::Tensor& rows) { return block.t().mm(rows); },
          add_widened);
    }
  }

  // acc += product, where acc is contiguous: the accumulator in its own dtype, or
  // float32 for a bfloat16 or half product, which is widened a vector at a time as it
  // is read, where ATen's CPU add_ would first copy all of it into a float32
  // temporary. The same sums, each rounded once, as add_'s.
  static void add_widened(at::Tensor& acc, const at::Tensor& product) {
    if (product.scalar_type() == acc.scalar_type()) {
      acc.add_(product);
      return;
    }
    TORCH_INTERNAL_ASSERT(acc.scalar_type() == at::kFloat && acc.is_contiguous() &&
                          acc.sizes() == product.sizes());
    const at::Tensor p = product.contiguous();
    float* out = acc.data_ptr<float>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(p.scalar_type(), "add_widened", [&] {
      using Vec = at::vec::Vectorized<scalar_t>;
      using FVec = at::vec::Vectorized<float>;
      const scalar_t* in = p.const_data_ptr<scalar_t>();
      at::parallel_for(0, p.numel(), kAddGrain, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + Vec::size() <= end; i += Vec::size()) {
          const auto [low, high] = at::vec::convert_to_float<scalar_t>(Vec::loadu(in + i));
          (FVec::loadu(out + i) + low).store(out + i);
          (FVec::loadu(out + i + FVec::size()) + high).store(out + i + FVec::size());
        }
        for (; i < end; ++i) out[i] += static_cast<float>(in[i]);
      });
    });
  }

  // Elements per task of add_widened: enough that a task outlasts its start.
  static constexpr int64_t kAddGrain = 32768;
};

// The operands in the layout the kernels read.
struct Operands {
  at::Tensor x;                     // (R, H) contiguous
  at::Tensor w;                     // (V, H) contiguous
  std::optional<at::Tensor> b;      // (V) contiguous
  at::Tensor target;                // (R,) int64 or (R, V) contiguous
  at::Tensor weight;                // (V), or undefined
  bool class_targets;
};

// Class indices are checked against `classes`: the layer's, or with a shard of
// the classes every class's.
Operands prepare(const char* op, const at::Tensor& input, const at::Tensor& linear_weight,
                 const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, int64_t classes = -1) {
  Operands p{input.contiguous(),
             linear_weight.contiguous(),
             linear_bias.has_value() ? std::optional<at::Tensor>(linear_bias->contiguous()) : std::nullopt,
             target.contiguous(),
             weight.has_value() ? *weight : at::Tensor(),
             !target.is_floating_point()};
  if (p.class_targets) {
    ce::check_class_indices(op, p.target.data_ptr<int64_t>(), p.target.numel(), classes < 0 ? p.w.size(0) : classes,
                            ignore_index);
  }
  return p;
}

// Rows [begin, begin + count) of the targets, for the chunk of logits `z`.
template <typename scalar_t>
ce::Rows<scalar_t> chunk_rows_of(const Operands& p, const scalar_t* z, int64_t begin, int64_t count) {
  const int64_t classes = p.w.size(0);
  return {z, count, classes, p.class_targets ? p.target.data_ptr<int64_t>() + begin : nullptr,
          p.class_targets ? nullptr : p.target.data_ptr<scalar_t>() + begin * classes};
}

// The mean's divisor: the summed weights of the class targets not ignored, or
// the number of rows for probabilities, each times the row's sample weight
// (`sample_weight`, in the accumulation type, where defined). Known before the
// first chunk, so that forward can scale the gradients as it computes them; the
// products and their order as forward's total_weight has them.
double mean_divisor(const Operands& p, const at::Tensor& sample_weight, int64_t ignore_index) {
  const int64_t rows = p.x.size(0);
  const at::Tensor s = sample_weight.defined() ? sample_weight.to(at::kDouble) : at::Tensor();
  const double* s_p = s.defined() ? s.data_ptr<double>() : nullptr;
  if (!p.class_targets) {
    if (s_p == nullptr) return static_cast<double>(rows);
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) total += s_p[r];
    return total;
  }
  const auto acc_type = at::toOpMathType(p.x.scalar_type());
  // The class weights as forward reads them: in the accumulation type.
  const at::Tensor w = p.weight.defined() ? p.weight.to(acc_type).to(at::kDouble).contiguous() : at::Tensor();
  const double* w_p = w.defined() ? w.data_ptr<double>() : nullptr;
  const int64_t* t = p.target.data_ptr<int64_t>();
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (t[r] == ignore_index) continue;
    const double w_t = w_p == nullptr ? 1.0 : w_p[t[r]];
    total += s_p == nullptr ? w_t : w_t * s_p[r];
  }
  return total;
}

// The kernels behind the ops of linear_cross_entropy.h, which has checked their arguments.
struct CpuKernels {
  static LinearCrossEntropyForward forward(const char* op, const at::Tensor& input, const at::Tensor& linear_weight,
                                           const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& sample_weight, const LinearLossOptions& o,
                                           std::array<bool, 3> grad_mask) {
    const Operands p = prepare(op, input, linear_weight, linear_bias, target, weight, o.ignore_index);
    const int64_t rows = p.x.size(0);
    const int64_t classes = p.w.size(0);
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const auto acc_options = p.x.options().dtype(acc_type);
    at::Tensor row_max = at::empty({rows}, acc_options);
    at::Tensor row_log_sum = at::empty({rows}, acc_options);
    at::Tensor target_logit = at::empty({rows}, acc_options);
    at::Tensor total_weight = at::empty({}, acc_options);
    at::Tensor row_entropy = at::empty({o.entropy ? rows : 0}, acc_options);
    const at::Tensor row_sample_weight = ce::rows_in(sample_weight, acc_type);
    at::Tensor loss = at::empty(o.reduction == at::Reduction::None ? at::IntArrayRef{rows} : at::IntArrayRef{},
                                p.x.options());
    const bool grads = o.reduction != at::Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
    LinearGrads g = grads ? make_linear_grads(p.x, p.w, grad_mask) : LinearGrads{};
    double grad_scale = 1;
    if (grads && o.reduction == at::Reduction::Mean) {
      const double divisor = mean_divisor(p, row_sample_weight, o.ignore_index);
      grad_scale = divisor == 0 ? std::nan("") : 1 / divisor;
    }
    const int64_t chunk = chunk_rows(rows, classes, p.x.element_size(), o.chunk_size);

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "linear_cross_entropy_forward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<double> losses(rows), weights(rows);
          acc_t* max_p = row_max.data_ptr<acc_t>();
          acc_t* log_sum_p = row_log_sum.data_ptr<acc_t>();
          acc_t* target_logit_p = target_logit.data_ptr<acc_t>();
          acc_t* entropy_p = o.entropy ? row_entropy.data_ptr<acc_t>() : nullptr;
          // Only the sample weights: the extras' gradients come with backward's upstream ones.
          ce::RowFactors<acc_t> factors;
          factors.sample_weight = row_sample_weight.defined() ? row_sample_weight.data_ptr<acc_t>() : nullptr;
          for_each_chunk(p.x, p.w, p.b, chunk, grads, g, CpuGemms{},
                         [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                           scalar_t* z = logits.data_ptr<scalar_t>();
                           const ce::Rows<scalar_t> chunk_in = chunk_rows_of(p, z, begin, count);
                           const ce::RowFactors<acc_t> chunk_factors = factors.from(begin);
                           ce::forward(chunk_in, p.weight, chunk_factors.sample_weight, o,
                                       ce::ForwardOut<acc_t>{losses.data() + begin, max_p + begin,
                                                             log_sum_p + begin, target_logit_p + begin,
                                                             weights.data() + begin,
                                                             entropy_p == nullptr ? nullptr : entropy_p + begin});
                           if (grads) {
                             ce::backward(chunk_in, z, p.weight, max_p + begin, log_sum_p + begin, nullptr,
                                          grad_scale, o, chunk_factors);
                           }
                         });
          ce::reduce_rows<scalar_t>(losses, weights, o.reduction, loss, total_weight);
        });
    const LinearGradOutputs out = grads ? finish(g, p.x.scalar_type()) : LinearGradOutputs{};
    return {loss,         row_max,          row_log_sum,      target_logit,    total_weight,
            row_entropy,  std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  // The backward chunk loop: each chunk's logits again, turned into their
  // gradient by the row kernels (of a shard of the classes, with `shard`).
  static LinearGradOutputs backward(const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
                                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                                    const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                                    const RowExtras& extras, const LinearLossOptions& o,
                                    std::array<bool, 3> output_mask, const ClassShard* shard) {
    if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {};
    const Operands p = prepare(op, input, linear_weight, linear_bias, target, weight, o.ignore_index,
                               shard != nullptr ? shard->classes : -1);
    const int64_t rows = p.x.size(0);
    const auto acc_type = at::toOpMathType(p.x.scalar_type());
    const ce::BackwardInputs b =
        ce::backward_inputs(grad_loss, row_max, row_log_sum, total_weight, o.reduction, acc_type, sample_weight,
                            extras.grad_logprob, extras.grad_entropy, extras.row_entropy);
    const at::Tensor row_weight = shard != nullptr ? shard->row_weight.to(acc_type).contiguous() : at::Tensor();
    LinearGrads g = make_linear_grads(p.x, p.w, output_mask);
    const int64_t chunk = chunk_rows(rows, p.w.size(0), p.x.element_size(), o.chunk_size);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const acc_t* scales = b.row_scale.defined() ? b.row_scale.data_ptr<acc_t>() : nullptr;
          const double weight_sum = shard != nullptr ? shard->weight_sum.item<double>() : 0;
          const ce::RowFactors<acc_t> factors = b.factors<acc_t>();
          for_each_chunk(p.x, p.w, p.b, chunk, true, g, CpuGemms{},
                         [&](const at::Tensor& logits, int64_t begin, int64_t count) {
                           scalar_t* z = logits.data_ptr<scalar_t>();
                           std::optional<ce::Shard<acc_t>> chunk_shard;
                           if (shard != nullptr) {
                             chunk_shard = ce::Shard<acc_t>{shard->class_start, shard->classes, weight_sum,
                                                            row_weight.data_ptr<acc_t>() + begin};
                           }
                           ce::backward(chunk_rows_of(p, z, begin, count), z, p.weight,
                                        b.row_max.data_ptr<acc_t>() + begin,
                                        b.row_log_sum.data_ptr<acc_t>() + begin,
                                        scales == nullptr ? nullptr : scales + begin, b.common_scale, o,
                                        factors.from(begin), chunk_shard ? &*chunk_shard : nullptr);
                         });
        });
    return finish(g, p.x.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) { register_linear_cross_entropy_ops<CpuKernels>(m); }

}  // namespace myext
