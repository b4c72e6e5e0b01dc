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
  // The logits of a chunk or block, valid until the next call. ATen's GEMM writes
  // them into one buffer that every chunk and block of the call reuses: a fresh
  // chunk-sized tensor each time would fault its pages in anew, and chunks just under
  // glibc's mmap threshold would be left to its heap, which fragments and keeps
  // growing from call to call. oneDNN's matmul has no output argument: its own tensor.
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    if (onednn(x, w.t())) return cpu::onednn_linear(x, w, b);
    const int64_t size = x.size(0) * w.size(0);
    if (!logits_buffer.defined() || logits_buffer.numel() < size || logits_buffer.scalar_type() != x.scalar_type()) {
      logits_buffer = at::Tensor();  // the old one freed first
      logits_buffer = at::empty({size}, x.options());
    }
    at::Tensor out = logits_buffer.narrow(0, 0, size).view({x.size(0), w.size(0)});
    return b.has_value() ? at::addmm_out(out, *b, x, w.t()) : at::mm_out(out, x, w.t());
  }
  mutable at::Tensor logits_buffer;

  // Whether a @ b goes to oneDNN: as the probe says, unless `aten_only`. The reduced
  // dtypes' step sets it: their two libraries run within a few percent of each other
  // (docs/GEMM.md), and oneDNN's linear copies a transposed operand whole (the weight
  // for the input gradient, a block's logits for the weight gradient) and writes a
  // fresh output, which would double the step's memory beyond its gradients.
  bool aten_only = false;
  bool onednn(const at::Tensor& a, const at::Tensor& b) const { return !aten_only && cpu::use_onednn(a, b); }

  void input_grad(const at::Tensor& d, const at::Tensor& w, at::Tensor out) const {
    if (onednn(d, w)) {
      out.copy_(cpu::onednn_linear(d, w.t(), std::nullopt));
    } else {
      at::mm_out(out, d, w);
    }
  }

  // out = d^T @ x, into `out` (contiguous, of d's dtype): one GEMM over every row of
  // d, which sums them in float32 and rounds once, as eager's weight gradient does.
  void weight_grad(const at::Tensor& d, const at::Tensor& x, at::Tensor out) const {
    if (onednn(d.t(), x)) {
      out.copy_(cpu::onednn_linear(d.t(), x.t(), std::nullopt));
    } else {
      at::mm_out(out, d.t(), x);
    }
  }

  // With one chunk of every row, a reduced dtype's weight gradient needs no float32
  // accumulator: the chunk's GEMM writes it (into `acc`, of the input's dtype).
  bool assign_weight_grad = false;

  // acc += d^T @ x: in the accumulator's own dtype, or for a reduced dtype (where its
  // accumulator fits the step's memory budget, weight_by_class_blocks) into float32.
  void add_weight_grad(at::Tensor& acc, const at::Tensor& d, const at::Tensor& x) const {
    if (assign_weight_grad) {
      weight_grad(d, x, acc);
      return;
    }
    if (acc.scalar_type() == d.scalar_type()) {
      // In the accumulator's own dtype ATen's addmm_ adds the product in place. oneDNN's
      // matmul has no accumulating form here: it would write each block's product for
      // an add over the accumulator, a pass the probe's timing of bare GEMMs does not
      // see (taken at N=2048, H=4096, V=128000 float32 on the AMD EPYC family 25 model
      // 17, where the probe put the blocks' GEMM on oneDNN, the step took 41 s against
      // 35 s).
      acc.addmm_(d.t(), x);
    } else if (onednn(d.narrow(1, 0, std::min(kWeightGradBlock, d.size(1))).t(), x)) {
      // A reduced dtype's product is added into the float32 accumulator on either
      // library: the probe compares like with like.
      add_weight_grad_blocked(
          acc, d, x,
          [](const at::Tensor& block, const at::Tensor& rows) {
            return cpu::onednn_linear(block.t(), rows.t(), std::nullopt);
          },
          add_widened);
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

// The weight gradient of a reduced dtype (bfloat16, half) by blocks of classes.
//
// Accumulated over chunks of rows it would need a float32 (V, H) accumulator, twice
// the size of the gradient itself and several times a chunk's logits. Instead, once
// the rows' max and log-sum are known (the row chunks' pass), each block of classes
// gets its logits for every row again (rows x block, about a chunk's bytes), the row
// kernels turn them into their gradient as for a shard of the classes, and one GEMM
// over every row writes the block's rows of the weight gradient: summed in float32
// and rounded once, as eager's GEMM does, with no accumulator. The cost is the
// logits' GEMM once more (four GEMMs where three would do) and a second row pass;
// the accumulation it replaces (a product per block and chunk, widened and added into
// the accumulator) cost more on the CPUs measured (docs/BENCHMARKS.md).

// Whether a reduced dtype's weight gradient goes by blocks of classes: where its
// float32 accumulator (V x H) would take more than the step's logits themselves (R x V
// of the dtype, what torch.compile's step holds), i.e. R < 2 H in bfloat16. Elsewhere
// the accumulation's three GEMMs stay: the blocks' fourth GEMM made the step a third
// slower on the AMD EPYC (family 25 model 17, N=4096 H=1024 V=32000: 3.11 s against
// 2.34 s, compile 2.31 s), a price the 1/8-of-the-logits memory budget does not
// justify where the accumulator is already below the logits.
// (With one chunk of every row neither is needed: its GEMM writes the gradient.)
inline bool weight_by_class_blocks(int64_t rows, int64_t features, int64_t element_size, int64_t chunk) {
  return chunk >= rows || features * 4 > rows * element_size;
}

// Classes per block: the block's logits of every row take about a chunk's bytes (a
// probability target's block is copied too, so half as many classes), a multiple of
// kBlockAlign, at least kMinBlockClasses.
constexpr int64_t kBlockAlign = 64;
constexpr int64_t kMinBlockClasses = 256;

int64_t block_classes(int64_t rows, int64_t classes, int64_t chunk, bool probabilities) {
  int64_t fit = chunk * classes / std::max<int64_t>(1, rows) / (probabilities ? 2 : 1);
  fit = std::max(kMinBlockClasses, fit / kBlockAlign * kBlockAlign);
  return std::max<int64_t>(1, std::min(classes, fit));
}

// The class shard a block's rows are, besides its start: the classes of the whole
// rows, the sum of their weights, and each row's sum(w q) over them.
template <typename acc_t>
struct BlockRows {
  int64_t class_start;
  int64_t classes;
  double weight_sum;
  const acc_t* row_weight;
};

// Each row's sum(w q) over every class (backward_class_row's and backward_prob_row's
// own, in their order), and the sum of the class weights, for rows that hold all
// the classes; into `storage`.
template <typename scalar_t>
BlockRows<at::opmath_type<scalar_t>> whole_rows(const Operands& p, const LossOptions& options,
                                                at::Tensor& storage) {
  using T = at::opmath_type<scalar_t>;
  const int64_t rows = p.x.size(0), classes = p.w.size(0);
  at::Tensor weight_storage;
  std::vector<T> block_sums;
  const ce::Options<T> o = ce::make_options<T>(classes, p.weight, options, weight_storage, block_sums);
  storage = at::empty({rows}, p.x.options().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = storage.data_ptr<T>();
  const bool smoothing = o.smoothing > T(0);
  const T eps_c = o.smoothing / T(o.classes);
  if (p.class_targets) {
    const int64_t* t = p.target.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      // An ignored row's gradient is 0 whatever its weight.
      const T w_t = t[r] == o.ignore_index ? T(0) : ce::class_weight(o, t[r]);
      out[r] = (T(1) - o.smoothing) * w_t + (smoothing ? eps_c * o.weight_sum : T(0));
    }
  } else {
    const scalar_t* q = p.target.data_ptr<scalar_t>();
    at::parallel_for(0, rows, ce::rows_per_task(classes), [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t r = begin; r < end; ++r) {
        const ce::TargetWeights<T> weights{ce::row_as_acc<scalar_t, T>(q, r, classes, scratch), o.weight,
                                           T(1) - o.smoothing, eps_c};
        out[r] = ce::target_weight_sum(weights, classes);
      }
    });
  }
  // make_options's sum, in double, of which backward_rows takes T's rounding as
  // make_options does.
  double weight_sum = static_cast<double>(classes);
  if (o.weight != nullptr) {
    weight_sum = 0;
    for (int64_t start = 0; start < classes; start += ce::kBlock) {
      double sum = 0;
      for (int64_t c = start; c < std::min(classes, start + ce::kBlock); ++c) sum += o.weight[c];
      weight_sum += sum;
    }
  }
  return {0, classes, weight_sum, out};
}

// The weight gradient into `out` (V, H) of the input's dtype, by blocks of `block`
// classes; the rows' statistics and factors as backward_rows takes them, and
// `shard` the classes the rows hold ([shard.class_start, ... + V) of shard.classes).
template <typename scalar_t>
void weight_grad_by_class_blocks(const Operands& p, at::Tensor& out, int64_t block,
                                 const at::opmath_type<scalar_t>* row_max,
                                 const at::opmath_type<scalar_t>* row_log_sum,
                                 const at::opmath_type<scalar_t>* row_scale, double common_scale,
                                 const LossOptions& o, const ce::RowFactors<at::opmath_type<scalar_t>>& factors,
                                 const BlockRows<at::opmath_type<scalar_t>>& shard, const CpuGemms& gemms) {
  const int64_t rows = p.x.size(0), classes = p.w.size(0);
  if (rows == 0) {
    out.zero_();
    return;
  }
  for (int64_t begin = 0; begin < classes; begin += block) {
    const int64_t count = std::min(block, classes - begin);
    const std::optional<at::Tensor> bias =
        p.b.has_value() ? std::optional<at::Tensor>(p.b->narrow(0, begin, count)) : std::nullopt;
    at::Tensor logits = gemms.linear(p.x, p.w.narrow(0, begin, count), bias);
    scalar_t* z = logits.data_ptr<scalar_t>();
    const at::Tensor q = p.class_targets ? at::Tensor() : p.target.narrow(1, begin, count).contiguous();
    const ce::Rows<scalar_t> in{z, rows, count, p.class_targets ? p.target.data_ptr<int64_t>() : nullptr,
                                p.class_targets ? nullptr : q.data_ptr<scalar_t>()};
    const ce::Shard<at::opmath_type<scalar_t>> block_shard{shard.class_start + begin, shard.classes,
                                                           shard.weight_sum, shard.row_weight};
    ce::backward(in, z, p.weight.defined() ? p.weight.narrow(0, begin, count) : at::Tensor(), row_max,
                 row_log_sum, row_scale, common_scale, o, factors, &block_shard);
    gemms.weight_grad(logits, p.x, out.narrow(0, begin, count));
  }
}

// Whether a reduced dtype's weight gradient is summed in that dtype (accum_dtype): a
// choice for memory, which keeps the GEMMs on ATen (CpuGemms::aten_only), whose bfloat16
// addmm_ adds each chunk's product into the gradient in place where oneDNN would copy
// the weight for the input gradient.
inline bool sums_in_reduced_dtype(const at::Tensor& x, at::ScalarType weight_acc) {
  return weight_acc == x.scalar_type() && at::toOpMathType(x.scalar_type()) != x.scalar_type();
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
    // The rows of 32 MiB of logits in their own dtype, as on the GPU: a bfloat16 GEMM
    // does its rows' work in half a float32 one's time and needs twice the rows to run
    // at full speed (at N=4096, H=1024, V=32000 the CPU step took 2.24 s in chunks of
    // 512 rows against 2.31 s in chunks of 256, docs/BENCHMARKS.md).
    const int64_t chunk = chunk_rows(rows, classes, p.x.element_size(), o.chunk_size);
    // A reduced dtype's weight gradient summed in float32: by the chunk's GEMM where one
    // chunk holds every row, by blocks of classes after the chunks where a float32
    // accumulator would not fit the memory budget (weight_by_class_blocks), else
    // accumulated over the chunks. Summed in the dtype itself (accum_dtype), over the chunks.
    const at::ScalarType weight_acc = weight_grad_dtype(o, p.x.scalar_type());
    const bool weight_by_blocks = grads && grad_mask[1] && weight_acc != p.x.scalar_type() &&
                                  weight_by_class_blocks(rows, p.x.size(1), p.x.element_size(), chunk);
    LinearGrads g = grads ? make_linear_grads(p.x, p.w, {grad_mask[0], grad_mask[1] && !weight_by_blocks, grad_mask[2]},
                                              weight_acc)
                          : LinearGrads{};
    double grad_scale = 1;
    if (grads && o.reduction == at::Reduction::Mean) {
      const double divisor = mean_divisor(p, row_sample_weight, o.ignore_index);
      grad_scale = divisor == 0 ? std::nan("") : 1 / divisor;
    }
    // The weight gradient's tensor is there for the chunks only where their GEMM writes
    // it; else the blocks after them do.
    CpuGemms gemms;
    gemms.aten_only = weight_by_blocks || sums_in_reduced_dtype(p.x, weight_acc);
    // (Not for no rows: no chunk runs; the blocks write the zeros.)
    gemms.assign_weight_grad = weight_by_blocks && chunk >= rows && rows > 0;
    if (gemms.assign_weight_grad) g.weight = at::empty(p.w.sizes(), p.w.options());

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
          for_each_chunk(p.x, p.w, p.b, chunk, grads, g, gemms,
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
          if (weight_by_blocks && !gemms.assign_weight_grad) {
            g.weight = at::empty(p.w.sizes(), p.w.options());
            at::Tensor row_weight;
            weight_grad_by_class_blocks<scalar_t>(
                p, g.weight, block_classes(rows, classes, chunk, !p.class_targets), max_p, log_sum_p, nullptr,
                grad_scale, o, factors, whole_rows<scalar_t>(p, o, row_weight), gemms);
          }
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
    const int64_t classes = p.w.size(0);
    const int64_t chunk = chunk_rows(rows, classes, p.x.element_size(), o.chunk_size);  // as forward's
    // As forward: a reduced dtype's weight gradient summed in float32 by blocks of
    // classes, or by the GEMM of the one chunk.
    const at::ScalarType weight_acc = weight_grad_dtype(o, p.x.scalar_type());
    const bool weight_by_blocks = output_mask[1] && weight_acc != p.x.scalar_type() &&
                                  weight_by_class_blocks(rows, p.x.size(1), p.x.element_size(), chunk);
    LinearGrads g = make_linear_grads(p.x, p.w, {output_mask[0], output_mask[1] && !weight_by_blocks, output_mask[2]},
                                      weight_acc);
    // The weight gradient's tensor is there for the chunks only where their GEMM writes
    // it; else the blocks after them do.
    CpuGemms gemms;
    gemms.aten_only = weight_by_blocks || sums_in_reduced_dtype(p.x, weight_acc);
    // (Not for no rows: no chunk runs; the blocks write the zeros.)
    gemms.assign_weight_grad = weight_by_blocks && chunk >= rows && rows > 0;
    if (gemms.assign_weight_grad) g.weight = at::empty(p.w.sizes(), p.w.options());
    // The row chunks: for the input and bias gradients, and for the weight's but where
    // the blocks of classes compute it (which need no chunk: forward gave the rows'
    // statistics).
    const bool chunks = output_mask[0] || output_mask[2] || !weight_by_blocks || gemms.assign_weight_grad;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const acc_t* scales = b.row_scale.defined() ? b.row_scale.data_ptr<acc_t>() : nullptr;
          const double weight_sum = shard != nullptr ? shard->weight_sum.item<double>() : 0;
          const ce::RowFactors<acc_t> factors = b.factors<acc_t>();
          if (chunks) {
            for_each_chunk(p.x, p.w, p.b, chunk, true, g, gemms,
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
          }
          if (weight_by_blocks && !gemms.assign_weight_grad) {
            g.weight = at::empty(p.w.sizes(), p.w.options());
            at::Tensor whole_row_weight;
            const BlockRows<acc_t> block_rows =
                shard != nullptr
                    ? BlockRows<acc_t>{shard->class_start, shard->classes, weight_sum, row_weight.data_ptr<acc_t>()}
                    : whole_rows<scalar_t>(p, o, whole_row_weight);
            weight_grad_by_class_blocks<scalar_t>(p, g.weight, block_classes(rows, classes, chunk, !p.class_targets),
                                                  b.row_max.data_ptr<acc_t>(), b.row_log_sum.data_ptr<acc_t>(),
                                                  scales, b.common_scale, o, factors, block_rows, gemms);
          }
        });
    return finish(g, p.x.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) { register_linear_cross_entropy_ops<CpuKernels>(m); }

}  // namespace myext
