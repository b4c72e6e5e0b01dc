// Cross-entropy on the CPU. Each row of logits is read once from memory in
// forward (an online softmax over L1-sized blocks gives max, sum of
// exponentials and the loss terms together) and once in backward, which
// writes the gradient in the same sweep. Forward keeps only the per-row
// log-sum-exp for backward. Rows are split across threads; bfloat16 and
// float16 rows are widened to float32 in a per-thread scratch row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "large_alloc.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace myext {
namespace {

using at::vec::Vectorized;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Elements per block of the online softmax: small enough that the second
// look at a block (the exponentials) hits L1.
constexpr int64_t kBlock = 2048;

int64_t rows_per_task(int64_t classes) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, classes));
}

template <typename T>
T hmax(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec vmax(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  }
  T m = at::vec::vec_reduce_all<T>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum(exp(x - shift)) over n elements. exp_u20 (within 20 ulp, as ATen's own
// softmax kernels use) is about twice as fast as the 1-ulp exp.
template <typename T>
T sum_exp(const T* x, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc = acc + (Vec::loadu(x + i) - vshift).exp_u20();
  }
  if (i < n) {
    // Lanes past the end load -inf and add exp(-inf) = 0.
    Vec tail(-std::numeric_limits<T>::infinity());
    Vec partial = Vec::loadu(x + i, n - i);
    tail = Vec::set(tail, partial, n - i);
    acc = acc + (tail - vshift).exp_u20();
  }
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
}

// sum(a * b) over n elements; b == nullptr means b is all ones.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec va = Vec::loadu(a + i);
    acc = b == nullptr ? acc + va : at::vec::fmadd(va, Vec::loadu(b + i), acc);
  }
  T total = at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc);
  for (; i < n; ++i) total += b == nullptr ? a[i] : a[i] * b[i];
  return total;
}

// log(sum(exp(x))) as max + log(sum(exp(x - max))), in one pass from memory:
// each block is reduced for its max, then summed from L1 against the running
// max, rescaling the running sum when the max grows. The two parts are kept
// apart so that the loss, (max - x_t) + log_sum, keeps its precision for
// logits of large magnitude.
template <typename T>
struct LogSumExp {
  T max;
  T log_sum;
  T value() const { return max + log_sum; }
};

template <typename T>
LogSumExp<T> logsumexp(const T* x, int64_t n) {
  T running_max = -std::numeric_limits<T>::infinity();
  T running_sum = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const T block_max = hmax(x + start, len);
    if (block_max > running_max) {
      // (An empty running sum needs no rescaling: short rows skip an exp.)
      if (running_sum != T(0)) running_sum *= std::exp(running_max - block_max);
      running_max = block_max;
    }
    running_sum += sum_exp(x + start, len, running_max);
  }
  return {running_max, std::log(running_sum)};
}

// The per-row quantities of the loss and its gradient. With q the target
// distribution after label smoothing and w the class weights (ones if none):
//   loss = lse * sum(w q) - sum(w q x),   grad = sum(w q) * softmax(x) - w q.
// For a class-index target q = (1 - eps) onehot(t) + eps / C.
template <typename T>
struct Options {
  const T* weight;  // nullptr: every class weighs 1
  T weight_sum;     // sum of the class weights (C without weights)
  int64_t classes;
  int64_t ignore_index;
  T smoothing;
};

template <typename T>
T class_weight(const Options<T>& o, int64_t c) {
  return o.weight == nullptr ? T(1) : o.weight[c];
}

// The loss of a row with a class-index target, from its log-sum-exp, the
// target's logit and weight, and sum(w x) (read only with smoothing).
template <typename T>
T class_row_loss(const LogSumExp<T>& lse, T x_target, T w_target, T weighted_sum,
                 const Options<T>& o) {
  T loss = (T(1) - o.smoothing) * w_target * ((lse.max - x_target) + lse.log_sum);
  if (o.smoothing > T(0)) {
    // sum_c w_c (lse - x_c), with the max taken out first as above.
    const T sum_w_gap = o.weight_sum * lse.max - weighted_sum;
    loss += o.smoothing / T(o.classes) * (sum_w_gap + o.weight_sum * lse.log_sum);
  }
  return loss;
}

// Returns {loss, lse, weight of the row in the mean} for one row. Ignored rows
// skip the sweep: their lse is never read.
template <typename T>
std::array<T, 3> forward_class_row(const T* x, int64_t target,
                                   const Options<T>& o) {
  if (target == o.ignore_index) return {T(0), T(0), T(0)};
  const LogSumExp<T> lse = logsumexp(x, o.classes);
  const T w_t = class_weight(o, target);
  const T weighted_sum = o.smoothing > T(0) ? dot(x, o.weight, o.classes) : T(0);
  return {class_row_loss(lse, x[target], w_t, weighted_sum, o), lse.value(), w_t};
}

// Rows of few classes (the article's 10 digits) go Vec::size() rows at a time,
// one lane per row: the max, the sum of exponentials and the log become vector
// operations across rows. Row by row they are two horizontal reductions and a
// scalar log, most of the time such a row takes.
constexpr int64_t kFewClasses = 32;

// forward_class_row of Vec::size() consecutive rows of x, written to out[lane].
template <typename T>
void forward_class_rows_few(const T* x, const int64_t* target, const Options<T>& o,
                            std::array<T, 3>* out) {
  using Vec = Vectorized<T>;
  using Index = Vectorized<at::vec::int_same_size_t<T>>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t n = o.classes;
  const Index row_starts = Index::arange(0, n);
  std::array<Vec, kFewClasses> column;  // column[c]: class c of each lane's row
  Vec max(-std::numeric_limits<T>::infinity());
  for (int64_t c = 0; c < n; ++c) {
    column[c] = at::vec::gather<sizeof(T)>(x + c, row_starts);
    max = at::vec::maximum(max, column[c]);
  }
  Vec sum(T(0));
  Vec weighted_sum(T(0));  // sum(w x), for the smoothing term
  for (int64_t c = 0; c < n; ++c) {
    sum = sum + (column[c] - max).exp_u20();
    if (o.smoothing > T(0)) {
      weighted_sum = at::vec::fmadd(Vec(class_weight(o, c)), column[c], weighted_sum);
    }
  }
  T maxes[kLanes], log_sums[kLanes], dots[kLanes];
  max.store(maxes);
  sum.log().store(log_sums);
  weighted_sum.store(dots);
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const int64_t t = target[lane];
    if (t == o.ignore_index) {
      out[lane] = {T(0), T(0), T(0)};
      continue;
    }
    const LogSumExp<T> lse{maxes[lane], log_sums[lane]};
    const T w_t = class_weight(o, t);
    out[lane] = {class_row_loss(lse, x[lane * n + t], w_t, dots[lane], o), lse.value(), w_t};
  }
}

template <typename T>
std::array<T, 3> forward_prob_row(const T* x, const T* q_raw,
                                  const Options<T>& o) {
  const LogSumExp<T> lse = logsumexp(x, o.classes);
  // sum(w q) and sum(w q x) with q = (1 - eps) q_raw + eps / C.
  T sum_wq;
  T sum_wqx;
  if (o.weight == nullptr) {
    sum_wq = dot(q_raw, static_cast<const T*>(nullptr), o.classes);
    sum_wqx = dot(q_raw, x, o.classes);
  } else {
    sum_wq = dot(q_raw, o.weight, o.classes);
    sum_wqx = 0;
    using Vec = Vectorized<T>;
    Vec acc(T(0));
    int64_t i = 0;
    for (; i + Vec::size() <= o.classes; i += Vec::size()) {
      acc = at::vec::fmadd(Vec::loadu(q_raw + i) * Vec::loadu(o.weight + i),
                           Vec::loadu(x + i), acc);
    }
    sum_wqx = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
    for (; i < o.classes; ++i) sum_wqx += q_raw[i] * o.weight[i] * x[i];
  }
  sum_wq *= T(1) - o.smoothing;
  sum_wqx *= T(1) - o.smoothing;
  if (o.smoothing > T(0)) {
    const T eps_c = o.smoothing / T(o.classes);
    sum_wq += eps_c * o.weight_sum;
    sum_wqx += eps_c * dot(x, o.weight, o.classes);
  }
  const T loss = (sum_wq * lse.max - sum_wqx) + sum_wq * lse.log_sum;
  return {loss, lse.value(), T(1)};
}

// grad = scale * (a * softmax(x) - w * eps / C), then the target class gets
// -scale * (1 - eps) * w_t: the class-index form of sum(w q) softmax - w q.
template <typename T>
void backward_class_row(const T* x, T* grad, int64_t target, T lse, T scale,
                        const Options<T>& o) {
  using Vec = Vectorized<T>;
  const int64_t n = o.classes;
  if (target == o.ignore_index) {
    std::fill(grad, grad + n, T(0));
    return;
  }
  const T w_t = class_weight(o, target);
  const T eps_c = o.smoothing / T(n);
  const T a = scale * ((T(1) - o.smoothing) * w_t + eps_c * o.weight_sum);
  const T b = scale * eps_c;
  const Vec va(a), vb(b), vlse(lse);
  // count = Vec::size() but for the last, partial vector: a masked one, not a
  // scalar loop of std::exp, which would cost rows of a few classes most of their time.
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    Vec g = va * (Vec::loadu(x + i, count) - vlse).exp_u20();
    if (b != T(0)) {
      g = g - (o.weight == nullptr ? vb : vb * Vec::loadu(o.weight + i, count));
    }
    g.store(grad + i, count);
  }
  grad[target] -= scale * (T(1) - o.smoothing) * w_t;
}

template <typename T>
void backward_prob_row(const T* x, const T* q_raw, T* grad, T lse, T scale,
                       const Options<T>& o) {
  using Vec = Vectorized<T>;
  const int64_t n = o.classes;
  const T keep = T(1) - o.smoothing;
  const T eps_c = o.smoothing / T(n);
  const T sum_wq = keep * dot(q_raw, o.weight, n) + eps_c * o.weight_sum;
  const Vec va(scale * sum_wq), vlse(lse), vkeep(keep), veps(eps_c), vscale(scale);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);  // as in backward_class_row
    Vec wq = at::vec::fmadd(vkeep, Vec::loadu(q_raw + i, count), veps);
    if (o.weight != nullptr) wq = wq * Vec::loadu(o.weight + i, count);
    (va * (Vec::loadu(x + i, count) - vlse).exp_u20() - vscale * wq).store(grad + i, count);
  }
}

// Gives a pointer to row r of `src` as acc_t: the row itself when the types
// match, else the row widened into `scratch`.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t r, int64_t n,
                        std::vector<acc_t>& scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src + r * n;
  } else {
    scratch.resize(n);
    at::vec::convert(src + r * n, scratch.data(), n);
    return scratch.data();
  }
}

// Where row r of the gradient is computed: in place when the types match,
// else in `scratch`, narrowed into place by store_grad_row.
template <typename scalar_t, typename acc_t>
acc_t* grad_row_as_acc(scalar_t* dst, int64_t r, int64_t n,
                       std::vector<acc_t>& scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst + r * n;
  } else {
    scratch.resize(n);
    return scratch.data();
  }
}

template <typename scalar_t, typename acc_t>
void store_grad_row(const acc_t* row, scalar_t* dst, int64_t r, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    at::vec::convert(row, dst + r * n, n);
  }
}

template <typename acc_t>
Options<acc_t> make_options(const at::Tensor& weight_acc, int64_t classes,
                            int64_t ignore_index, double smoothing) {
  Options<acc_t> o;
  o.weight = weight_acc.defined() ? weight_acc.data_ptr<acc_t>() : nullptr;
  o.weight_sum = static_cast<acc_t>(classes);
  if (weight_acc.defined()) {
    o.weight_sum = 0;
    for (int64_t c = 0; c < classes; ++c) o.weight_sum += o.weight[c];
  }
  o.classes = classes;
  o.ignore_index = ignore_index;
  o.smoothing = static_cast<acc_t>(smoothing);
  return o;
}

void check_class_targets(const at::Tensor& target, int64_t classes,
                         int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < target.numel(); ++r) {
    TORCH_CHECK_INDEX(
        t[r] == ignore_index || (t[r] >= 0 && t[r] < classes),
        "cross_entropy: target holds class index ", t[r],
        ", expected a value in [0, ", classes, ") or ignore_index (",
        ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  const at::Tensor x = input.contiguous();
  const at::Tensor t = target.contiguous();
  const int64_t rows = x.size(0);
  const int64_t classes = x.size(1);
  const bool class_targets = t.dim() == 1;
  if (class_targets) check_class_targets(t, classes, ignore_index);

  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor weight_acc =
      weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  at::Tensor lse = at::empty({rows}, x.options().dtype(acc_type));
  at::Tensor total_weight = at::empty({}, x.options().dtype(acc_type));
  at::Tensor loss = at::empty(reduction == kNone ? at::IntArrayRef{rows}
                                                 : at::IntArrayRef{},
                              x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto o = make_options<acc_t>(weight_acc, classes, ignore_index,
                                           label_smoothing);
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const int64_t* tp = class_targets ? t.data_ptr<int64_t>() : nullptr;
        acc_t* lse_p = lse.data_ptr<acc_t>();
        std::vector<acc_t> losses(rows), row_weights(rows);
        at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> x_scratch, q_scratch;
          int64_t r = begin;
          if (class_targets && classes <= kFewClasses) {
            constexpr int64_t kLanes = Vectorized<acc_t>::size();
            std::array<std::array<acc_t, 3>, kLanes> res;
            for (; r + kLanes <= end; r += kLanes) {
              // The block of kLanes rows as one "row" of kLanes * classes elements.
              const acc_t* block = row_as_acc<scalar_t, acc_t>(xp + r * classes, 0, kLanes * classes,
                                                               x_scratch);
              forward_class_rows_few(block, tp + r, o, res.data());
              for (int64_t lane = 0; lane < kLanes; ++lane) {
                losses[r + lane] = res[lane][0];
                lse_p[r + lane] = res[lane][1];
                row_weights[r + lane] = res[lane][2];
              }
            }
          }
          for (; r < end; ++r) {
            const acc_t* row = row_as_acc<scalar_t, acc_t>(xp, r, classes, x_scratch);
            const auto res =
                class_targets
                    ? forward_class_row(row, tp[r], o)
                    : forward_prob_row(
                          row,
                          row_as_acc<scalar_t, acc_t>(t.data_ptr<scalar_t>(), r,
                                                      classes, q_scratch),
                          o);
            losses[r] = res[0];
            lse_p[r] = res[1];
            row_weights[r] = res[2];
          }
        });

        // Summed serially, in double, so that the result does not depend on
        // the number of threads; R values cost nothing next to the R x C sweep.
        double loss_sum = 0, weight_sum = 0;
        for (int64_t r = 0; r < rows; ++r) {
          loss_sum += losses[r];
          weight_sum += row_weights[r];
        }
        total_weight.data_ptr<acc_t>()[0] = static_cast<acc_t>(weight_sum);
        scalar_t* loss_p = loss.data_ptr<scalar_t>();
        if (reduction == kNone) {
          std::copy(losses.begin(), losses.end(), loss_p);
        } else {
          // An all-ignored mean is 0 / 0 = nan, as in PyTorch.
          const double value = reduction == kSum ? loss_sum : loss_sum / weight_sum;
          loss_p[0] = static_cast<scalar_t>(static_cast<acc_t>(value));
        }
      });
  return {loss, lse, total_weight};
}

// Writes the gradient of the loss w.r.t. the contiguous logits `x` into
// `grad_input`, which may be `x` itself: each element of a row is read before
// its gradient is stored, and half-precision rows are widened first.
void cross_entropy_backward_into(
    at::Tensor& grad_input, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  const at::Tensor t = target.contiguous();
  const int64_t rows = x.size(0);
  const int64_t classes = x.size(1);
  const bool class_targets = t.dim() == 1;
  if (class_targets) check_class_targets(t, classes, ignore_index);

  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor weight_acc =
      weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor lse_c = lse.to(acc_type).contiguous();
  // The factor of each row's gradient: its upstream gradient with no reduction,
  // else one scalar (divided by the mean's divisor).
  const at::Tensor row_scales =
      reduction == kNone ? grad_loss.to(acc_type).contiguous() : at::Tensor();
  double common_scale = 0;
  if (reduction != kNone) {
    common_scale = grad_loss.item<double>();
    if (reduction == kMean) common_scale /= total_weight.item<double>();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto o = make_options<acc_t>(weight_acc, classes, ignore_index,
                                           label_smoothing);
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* gp = grad_input.data_ptr<scalar_t>();
        const acc_t* lse_p = lse_c.data_ptr<acc_t>();
        const acc_t* scale_p =
            row_scales.defined() ? row_scales.data_ptr<acc_t>() : nullptr;
        const acc_t scale_all = static_cast<acc_t>(common_scale);
        at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> x_scratch, q_scratch, g_scratch;
          for (int64_t r = begin; r < end; ++r) {
            const acc_t* row = row_as_acc<scalar_t, acc_t>(xp, r, classes, x_scratch);
            acc_t* grad_row =
                grad_row_as_acc<scalar_t, acc_t>(gp, r, classes, g_scratch);
            if (class_targets) {
              backward_class_row(row, grad_row, t.data_ptr<int64_t>()[r],
                                 lse_p[r], scale_p ? scale_p[r] : scale_all, o);
            } else {
              backward_prob_row(
                  row,
                  row_as_acc<scalar_t, acc_t>(t.data_ptr<scalar_t>(), r, classes,
                                              q_scratch),
                  grad_row, lse_p[r], scale_p ? scale_p[r] : scale_all, o);
            }
            store_grad_row(grad_row, gp, r, classes);
          }
        });
      });
}

at::Tensor cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  const at::Tensor x = input.contiguous();
  at::Tensor grad_input = empty_large(x.sizes(), x.options());
  cross_entropy_backward_into(grad_input, grad_loss, x, target, weight, lse,
                              total_weight, reduction, ignore_index,
                              label_smoothing);
  return grad_input;
}

void cross_entropy_backward_inplace_cpu(
    const at::Tensor& grad_loss, at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
    double label_smoothing) {
  TORCH_CHECK(input.is_contiguous(),
              "cross_entropy_backward_: input must be contiguous");
  cross_entropy_backward_into(input, grad_loss, input, target, weight, lse,
                              total_weight, reduction, ignore_index,
                              label_smoothing);
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_inplace_cpu);
}

}  // namespace myext
