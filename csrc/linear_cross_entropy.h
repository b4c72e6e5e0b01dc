// The fused linear cross-entropy ops (schemas in myext.cpp), shared by their
// CPU and CUDA kernels: the argument checks, the one function per op that
// gathers its options and checks every argument before a device's kernel
// runs (register_linear_cross_entropy_ops), the chunk size, and the chunk
// loop, which each device runs with its own GEMMs and cross-entropy rows.
//
// The loop: rows of the input go in chunks; a chunk's logits are one GEMM into
// a chunk-sized buffer, never all R x V of them at once. The device's row step
// reads the buffer (each row's max, log-sum and loss) and, where gradients are
// wanted, overwrites it with the logits' gradient; the gradient GEMMs then
// read it: the chunk's rows of the input gradient, and the weight and bias
// gradients accumulated over chunks (the weight's in float32 for bfloat16 and
// float16, in the row blocks of kWeightGradBlock classes its device takes, or in
// the gradient itself where accum_dtype is the input's dtype; the CPU instead
// computes a reduced dtype's float32-summed weight gradient by blocks of classes
// after the loop where the accumulator would outgrow the logits:
// csrc/cpu/linear_cross_entropy.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cross_entropy.h"

#include <algorithm>
#include <array>
#include <optional>

namespace myext {

// The logits of one chunk take about kChunkBytes, in at least kFullSpeedRows rows
// where the vocabulary is too large for that: a GEMM over fewer rows reads the whole
// weight for too little work (at H=4096, V=128000 in float32, 128-row chunks made the
// CPU step 1.25x slower than 256-row ones, docs/BENCHMARKS.md), but never more rows
// for it than 1/8 of all of them, the step's memory budget. The rows are then shared
// equally among the chunks that makes, no chunk longer than that: at N=4096, V=32000
// in bfloat16, 16 chunks of 256 rows ran the CPU step 4% faster than 15 of 262 and one
// of 166.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kFullSpeedRows = 256;

// Rows per chunk: `requested` where > 0, else from the shapes and the logits'
// element size.
inline int64_t chunk_rows(int64_t rows, int64_t classes, int64_t element_size, int64_t requested) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, rows));
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, classes * element_size);
  const int64_t least = std::min(kFullSpeedRows, rows / 8);
  const int64_t most = std::max<int64_t>(1, std::min(rows, std::max(fit, least)));
  const int64_t chunks = std::max<int64_t>(1, (rows + most - 1) / most);
  return std::max<int64_t>(1, (rows + chunks - 1) / chunks);
}

// The options of the losses, the rows per chunk (0: chosen from the shapes) and
// the dtype the weight gradient is summed in over the chunks (none: the input's
// accumulation type, float32 for bfloat16 and float16).
struct LinearLossOptions : LossOptions {
  int64_t chunk_size;
  std::optional<at::ScalarType> accum_dtype;
};

// The dtype of the weight gradient's sum over the chunks of `input`'s rows.
inline at::ScalarType weight_grad_dtype(const LinearLossOptions& o, at::ScalarType input) {
  return o.accum_dtype.value_or(at::toOpMathType(input));
}

// input (R, H); linear_weight (V, H) and linear_bias (V) or absent, of the
// input's dtype and device; target, weight and sample_weight as
// cross_entropy's for (R, V) logits; the options; chunk_size >= 0.
inline void check_linear_cross_entropy_inputs(
    const char* op, const at::Tensor& input, const at::Tensor& linear_weight,
    const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sample_weight,
    const LinearLossOptions& o) {
  check_floating(op, "input", input);
  check_dim(op, "input", input, 2);
  check_like(op, "linear_weight", linear_weight, input);
  check_dim(op, "linear_weight", linear_weight, 2);
  TORCH_CHECK(linear_weight.size(1) == input.size(1), op, ": linear_weight must have shape (classes, ",
              input.size(1), "), the input's features last, got ", linear_weight.sizes());
  const int64_t classes = linear_weight.size(0);
  check_optional_vector(op, "linear_bias", linear_bias, classes, input);
  check_cross_entropy_targets(op, target, weight, input.size(0), classes, input);
  check_optional_rows(op, "sample_weight", sample_weight, input.size(0), input);
  check_cross_entropy_options(op, o);
  TORCH_CHECK(o.chunk_size >= 0, op, ": chunk_size must be >= 0 (0: chosen from the shapes), got ", o.chunk_size);
  const at::ScalarType acc = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(!o.accum_dtype.has_value() || *o.accum_dtype == acc || *o.accum_dtype == input.scalar_type(), op,
              ": accum_dtype must be None, ", acc, " or the input's dtype ", input.scalar_type(), ", got ",
              *o.accum_dtype);
}

// linear_cross_entropy_backward's: the forward's, the row outputs of the
// forward, grad_loss and the extras, and with `shard` the shard's
// (check_shard), whose columns are linear_weight's rows.
inline void check_linear_cross_entropy_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
    const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& total_weight, const RowExtras& extras,
    const LinearLossOptions& o, const ClassShard* shard = nullptr) {
  check_linear_cross_entropy_inputs(op, input, linear_weight, linear_bias, target, weight, sample_weight, o);
  check_cross_entropy_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, input.size(0), o.reduction,
                                  input);
  check_row_extras(op, extras, target, input.size(0), input);
  if (shard != nullptr) check_shard(op, input.size(0), linear_weight.size(0), *shard, input);
}

using LinearGradOutputs = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;
using LinearCrossEntropyForward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The ops' schema signatures over a device's `Kernels`, which take the
// arguments checked and the options whole:
//   LinearCrossEntropyForward forward(op, input, linear_weight, linear_bias, target,
//                                     weight, sample_weight, options, grad_mask)
//   LinearGradOutputs backward(op, grad_loss, input, linear_weight, linear_bias, target,
//                              weight, sample_weight, row_max, row_log_sum, total_weight,
//                              extras, options, output_mask, shard)
// where `shard` (a const ClassShard*) is null but for the shard's backward.
// The ops are public (torch.ops.myext.*): each checks every argument here,
// before any kernel reads them.
template <typename Kernels>
struct LinearCrossEntropyOps {
  static LinearCrossEntropyForward forward(const at::Tensor& input, const at::Tensor& linear_weight,
                                           const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& sample_weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                           double softcap, double temperature, bool entropy, int64_t chunk_size,
                                           std::array<bool, 3> grad_mask, std::optional<at::ScalarType> accum_dtype) {
    constexpr const char* op = "linear_cross_entropy_forward";
    const LinearLossOptions o{
        {reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy}, chunk_size,
        accum_dtype};
    check_linear_cross_entropy_inputs(op, input, linear_weight, linear_bias, target, weight, sample_weight, o);
    return Kernels::forward(op, input, linear_weight, linear_bias, target, weight, sample_weight, o, grad_mask);
  }

  static LinearGradOutputs backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
                                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                                    const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                                    const std::optional<at::Tensor>& grad_logprob,
                                    const std::optional<at::Tensor>& grad_entropy,
                                    const std::optional<at::Tensor>& row_entropy, int64_t reduction,
                                    int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                    double softcap, double temperature, bool entropy, int64_t chunk_size,
                                    std::array<bool, 3> output_mask, std::optional<at::ScalarType> accum_dtype) {
    constexpr const char* op = "linear_cross_entropy_backward";
    const LinearLossOptions o{
        {reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy}, chunk_size,
        accum_dtype};
    const RowExtras extras{grad_logprob, grad_entropy, row_entropy};
    check_linear_cross_entropy_backward_inputs(op, grad_loss, input, linear_weight, linear_bias, target, weight,
                                               sample_weight, row_max, row_log_sum, total_weight, extras, o);
    return Kernels::backward(op, grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight, row_max,
                             row_log_sum, total_weight, extras, o, output_mask, nullptr);
  }

  static LinearGradOutputs shard_backward(
      const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& linear_weight,
      const std::optional<at::Tensor>& linear_bias, const at::Tensor& target, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max, const at::Tensor& row_log_sum,
      const at::Tensor& row_weight, const at::Tensor& total_weight, const at::Tensor& weight_sum,
      const std::optional<at::Tensor>& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
      const std::optional<at::Tensor>& row_entropy, int64_t reduction, int64_t ignore_index, double label_smoothing,
      double lse_square_scale, double softcap, double temperature, bool entropy, int64_t class_start,
      int64_t classes, int64_t chunk_size, std::array<bool, 3> output_mask,
      std::optional<at::ScalarType> accum_dtype) {
    constexpr const char* op = "linear_cross_entropy_shard_backward";
    const LinearLossOptions o{
        {reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy}, chunk_size,
        accum_dtype};
    const RowExtras extras{grad_logprob, grad_entropy, row_entropy};
    const ClassShard shard{row_weight, weight_sum, class_start, classes};
    check_linear_cross_entropy_backward_inputs(op, grad_loss, input, linear_weight, linear_bias, target, weight,
                                               sample_weight, row_max, row_log_sum, total_weight, extras, o, &shard);
    return Kernels::backward(op, grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight, row_max,
                             row_log_sum, total_weight, extras, o, output_mask, &shard);
  }
};

// Registers the linear cross-entropy ops for the dispatch key of the library `m`.
template <typename Kernels>
void register_linear_cross_entropy_ops(torch::Library& m) {
  m.impl("linear_cross_entropy_forward", &LinearCrossEntropyOps<Kernels>::forward);
  m.impl("linear_cross_entropy_backward", &LinearCrossEntropyOps<Kernels>::backward);
  m.impl("linear_cross_entropy_shard_backward", &LinearCrossEntropyOps<Kernels>::shard_backward);
}

// Classes per block of the weight gradient where a device accumulates it from
// a temporary product (bfloat16 into float32, or a GEMM without accumulation):
// the temporary stays a small fraction of the chunk's buffer.
constexpr int64_t kWeightGradBlock = 2048;

// The gradients the loop accumulates: each undefined where not wanted.
struct LinearGrads {
  at::Tensor input;   // (R, H), the input's dtype
  at::Tensor weight;  // (V, H), float32 for bfloat16/float16 input unless accum_dtype says
  at::Tensor bias;    // (V), float64
};

// Gradient buffers for `mask` (input, weight, bias) of the operands, the
// weight's in `weight_dtype` (weight_grad_dtype).
inline LinearGrads make_linear_grads(const at::Tensor& input, const at::Tensor& linear_weight,
                                     std::array<bool, 3> mask, at::ScalarType weight_dtype) {
  LinearGrads g;
  if (mask[0]) g.input = at::empty(input.sizes(), input.options());
  if (mask[1]) g.weight = at::zeros(linear_weight.sizes(), linear_weight.options().dtype(weight_dtype));
  if (mask[2]) g.bias = at::zeros({linear_weight.size(0)}, linear_weight.options().dtype(at::kDouble));
  return g;
}

// The accumulated gradients in the input's dtype, None where not wanted.
inline LinearGradOutputs finish(const LinearGrads& g, at::ScalarType dtype) {
  const auto as_output = [&](const at::Tensor& t) -> std::optional<at::Tensor> {
    if (!t.defined()) return std::nullopt;
    return t.scalar_type() == dtype ? t : t.to(dtype);
  };
  return {as_output(g.input), as_output(g.weight), as_output(g.bias)};
}

// Runs the chunks of `input` (R, H), contiguous. For each, `gemms.linear`
// computes its logits and `row_step(logits, begin, count)` handles its rows
// [begin, begin + count); with `grads` (the row step then leaves the logits'
// gradient in the buffer), the gradients in `g` are accumulated.
//
// Gemms:
//   at::Tensor linear(x, w, b)         x @ w^T + b, contiguous (rows, V)
//   void input_grad(d, w, out)         out = d @ w
//   void add_weight_grad(acc, d, x)    acc += d^T @ x
template <typename Gemms, typename RowStep>
void for_each_chunk(const at::Tensor& input, const at::Tensor& linear_weight,
                    const std::optional<at::Tensor>& linear_bias, int64_t chunk, bool grads,
                    LinearGrads& g, const Gemms& gemms, const RowStep& row_step) {
  const int64_t rows = input.size(0);
  for (int64_t begin = 0; begin < rows; begin += chunk) {
    const int64_t count = std::min(chunk, rows - begin);
    const at::Tensor x = input.narrow(0, begin, count);
    at::Tensor logits = gemms.linear(x, linear_weight, linear_bias);
    row_step(logits, begin, count);
    if (!grads) continue;
    if (g.input.defined()) gemms.input_grad(logits, linear_weight, g.input.narrow(0, begin, count));
    if (g.weight.defined()) gemms.add_weight_grad(g.weight, logits, x);
    if (g.bias.defined()) g.bias.add_(logits.sum({0}, false, at::kDouble));
  }
}

// acc += d^T @ x in blocks of kWeightGradBlock classes, each through a
// temporary `product(d_block, x)` (d_block^T @ x, any dtype) that
// `accumulate(acc_block, product)` adds into its rows of acc.
template <typename Product, typename Accumulate>
void add_weight_grad_blocked(at::Tensor& acc, const at::Tensor& d, const at::Tensor& x, const Product& product,
                             const Accumulate& accumulate) {
  const int64_t classes = d.size(1);
  for (int64_t begin = 0; begin < classes; begin += kWeightGradBlock) {
    const int64_t count = std::min(kWeightGradBlock, classes - begin);
    at::Tensor acc_block = acc.narrow(0, begin, count);
    accumulate(acc_block, product(d.narrow(1, begin, count), x));
  }
}

}  // namespace myext
