// Cross-entropy on the CPU. Each row of logits is read once from memory in
// forward (an online softmax over L1-sized blocks gives the max, the sum of
// exponentials and the loss terms together) and once in backward, which
// writes the gradient in the same sweep. Forward keeps two numbers per row for
// backward, the row's max and log(sum(exp(x - max))), never their rounded sum:
// softmax = exp((x - max) - log_sum) is then as precise as PyTorch's at any
// scale of the logits. Rows are split across threads; bfloat16 and float16
// rows are widened to float32 in a per-thread scratch row.
//
// The per-row quantities: with q the target distribution after label
// smoothing (q = (1 - eps) target + eps / C, target one-hot for class indices)
// and w the class weights (ones if none),
//   loss = sum_c w_c q_c (lse - x_c) = sum(w q (max - x)) + sum(w q) log_sum,
//   grad = sum(w q) softmax(x) - w q.
// Every term of sum(w q (max - x)) is >= 0, so it is summed without the
// cancellation that sum(w q) max - sum(w q x) would suffer for large logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../cross_entropy.h"
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

// Elements per block of the online softmax: small enough that the second
// look at a block (the exponentials) hits L1.
constexpr int64_t kBlock = 2048;

int64_t rows_per_task(int64_t classes) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, classes));
}

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// max(a, b) that is NaN when either is.
template <typename T>
T nan_max(T a, T b) {
  return (a > b || std::isnan(a)) ? a : b;
}

template <typename T>
T hmax(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec vmax(-kInf<T>);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    vmax = at::vec::maximum(vmax, Vec::loadu(x + i));  // propagates NaN
  }
  T m = at::vec::vec_reduce_all<T>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

// sum(exp(x - shift)) over n elements, in double across blocks. exp_u20 (within
// 20 ulp, as ATen's own softmax kernels use) is well ahead of the 1-ulp exp here.
template <typename T>
double sum_exp(const T* x, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc = acc + (Vec::loadu(x + i) - vshift).exp_u20();
  }
  if (i < n) {
    // Lanes past the end load -inf and add exp(-inf) = 0.
    Vec tail(-kInf<T>);
    Vec partial = Vec::loadu(x + i, n - i);
    tail = Vec::set(tail, partial, n - i);
    acc = acc + (tail - vshift).exp_u20();
  }
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
}

// The options of one call, in the accumulation type.
template <typename T>
struct Options {
  const T* weight;      // nullptr: every class weighs 1
  const T* block_sums;  // the sum of the weights of each block of kBlock classes
  T weight_sum;         // sum of the class weights (C without weights)
  int64_t classes;
  int64_t ignore_index;
  T smoothing;
};

template <typename T>
T class_weight(const Options<T>& o, int64_t c) {
  return o.weight == nullptr ? T(1) : o.weight[c];
}

// The weights v of the gap sum sum(v (max - x)): ones or the class weights
// (label smoothing of class-index targets), or w q (probability targets).
// `load(i)` gives the vector of classes [i, i + Vec::size()), `load(i, count)`
// the first count of them, zero past count.
template <typename T>
struct Ones {
  static constexpr bool kOnes = true;
};

template <typename T>
struct ClassWeights {
  static constexpr bool kOnes = false;
  const T* weight;
  const T* block_sums;  // the sum of the weights of each block of kBlock classes
  Vectorized<T> load(int64_t i) const { return Vectorized<T>::loadu(weight + i); }
  Vectorized<T> load(int64_t i, int64_t count) const { return Vectorized<T>::loadu(weight + i, count); }
};

template <typename T>
struct TargetWeights {
  static constexpr bool kOnes = false;
  const T* q;       // the row's target probabilities
  const T* weight;  // nullptr: ones
  T keep;           // 1 - eps
  T eps_c;          // eps / C
  Vectorized<T> load(int64_t i) const {
    using Vec = Vectorized<T>;
    Vec v = at::vec::fmadd(Vec(keep), Vec::loadu(q + i), Vec(eps_c));
    return weight != nullptr ? v * Vec::loadu(weight + i) : v;
  }
  Vectorized<T> load(int64_t i, int64_t count) const {
    using Vec = Vectorized<T>;
    Vec v = at::vec::fmadd(Vec(keep), Vec::loadu(q + i, count), Vec(eps_c));
    if (weight != nullptr) v = v * Vec::loadu(weight + i, count);
    return Vec::set(Vec(T(0)), v, count);
  }
};

// (sum(v (m - x)), sum(v)) over n elements, v from `weights.load(offset + i)`.
// A -inf logit is +inf below a finite max; where the max itself is -inf (every
// logit so far -inf) each term is v times +inf, as PyTorch's v log(0) is.
template <typename T, typename Weights>
std::array<T, 2> weighted_gap(const T* x, int64_t n, T m, const Weights& weights, int64_t offset) {
  using Vec = Vectorized<T>;
  const bool all_minus_inf = m == -kInf<T>;
  const Vec vm(all_minus_inf ? kInf<T> : m), zero(T(0));
  // Class weights are the same for every row: their sums per block are known.
  constexpr bool kSumWeights = !Weights::kOnes && !std::is_same_v<Weights, ClassWeights<T>>;
  Vec gaps(T(0)), sums(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    // (With m = -inf every x is -inf too, and +inf - -inf is the +inf wanted.)
    const Vec diff = vm - Vec::loadu(x + i);
    if constexpr (Weights::kOnes) {
      gaps = gaps + diff;
    } else {
      const Vec v = weights.load(offset + i);
      gaps = at::vec::fmadd(v, diff, gaps);
      if constexpr (kSumWeights) sums = sums + v;
    }
  }
  if (i < n) {
    const int64_t count = n - i;
    const Vec diff = Vec::set(zero, vm - Vec::loadu(x + i, count), count);
    if constexpr (Weights::kOnes) {
      gaps = gaps + diff;
    } else {
      const Vec v = weights.load(offset + i, count);
      gaps = at::vec::fmadd(v, diff, gaps);
      if constexpr (kSumWeights) sums = sums + v;
    }
  }
  const auto add = [](Vec a, Vec b) { return a + b; };
  T weight;
  if constexpr (Weights::kOnes) {
    weight = static_cast<T>(n);
  } else if constexpr (kSumWeights) {
    weight = at::vec::vec_reduce_all<T>(add, sums);
  } else {
    weight = weights.block_sums[offset / kBlock];
  }
  return {at::vec::vec_reduce_all<T>(add, gaps), weight};
}

// A row's statistics: max, log(sum(exp(x - max))), and with weights v the gap
// sum(v (max - x)) and sum(v).
template <typename T>
struct RowStats {
  T max;
  double log_sum;
  T gap = 0;
  T weight = 0;
};

struct NoWeights {};

// One pass over the row from memory: each block is reduced for its max, then
// summed from L1 against the running max, rescaling the running sums when the
// max grows. A NaN logit makes the max NaN, and with it everything after.
template <typename T, typename Weights>
RowStats<T> row_stats(const T* x, int64_t n, const Weights& weights) {
  constexpr bool kGap = !std::is_same_v<Weights, NoWeights>;
  T running_max = -kInf<T>;
  double running_sum = 0;
  T gap = 0;
  T seen_weight = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const T block_max = hmax(x + start, len);
    if (!(block_max <= running_max)) {
      // (Empty running sums need no rescaling: short rows skip an exp.)
      if (running_sum != 0) running_sum *= std::exp(static_cast<double>(running_max) - block_max);
      if constexpr (kGap) {
        if (seen_weight != T(0)) gap += seen_weight * (block_max - running_max);
      }
      running_max = block_max;
    }
    // While every logit so far is -inf, exp(x - 0) adds the zeros it should.
    running_sum += sum_exp(x + start, len, running_max == -kInf<T> ? T(0) : running_max);
    if constexpr (kGap) {
      const auto [block_gap, block_weight] = weighted_gap(x + start, len, running_max, weights, start);
      gap += block_gap;
      seen_weight += block_weight;
    }
  }
  // A +inf logit makes x - max NaN, as in PyTorch (exp_u20 would give inf).
  const double log_sum = running_max == kInf<T> ? std::nan("") : std::log(running_sum);
  return {running_max, log_sum, gap, seen_weight};
}

// The loss of a row with class-index target t (not ignored): the target's
// term, plus with smoothing eps / C sum_c w_c (lse - x_c). In double: the
// terms are rounded once, into the loss.
template <typename T>
double class_row_loss(const RowStats<T>& s, T x_target, T w_target, const Options<T>& o) {
  const double gap_target = static_cast<double>(s.max) - x_target;
  double loss = (1.0 - o.smoothing) * w_target * (gap_target + s.log_sum);
  if (o.smoothing > T(0)) {
    loss += static_cast<double>(o.smoothing) / o.classes * (s.gap + static_cast<double>(o.weight_sum) * s.log_sum);
  }
  return loss;
}

// What forward writes for a row.
template <typename T>
struct RowResult {
  double loss;
  T max;
  double log_sum;
  T weight;  // the row's share of the mean's divisor
};

// Ignored rows skip the sweep: their max and log_sum are never read.
template <typename T>
RowResult<T> forward_class_row(const T* x, int64_t target, const Options<T>& o) {
  if (target == o.ignore_index) return {T(0), T(0), T(0), T(0)};
  const RowStats<T> s = o.smoothing <= T(0)       ? row_stats(x, o.classes, NoWeights{})
                        : o.weight == nullptr ? row_stats(x, o.classes, Ones<T>{})
                                              : row_stats(x, o.classes, ClassWeights<T>{o.weight, o.block_sums});
  const T w_t = class_weight(o, target);
  return {class_row_loss(s, x[target], w_t, o), s.max, s.log_sum, w_t};
}

template <typename T>
RowResult<T> forward_prob_row(const T* x, const T* q, const Options<T>& o) {
  const TargetWeights<T> weights{q, o.weight, T(1) - o.smoothing, o.smoothing / T(o.classes)};
  const RowStats<T> s = row_stats(x, o.classes, weights);
  // s.weight is sum(w q).
  return {s.gap + static_cast<double>(s.weight) * s.log_sum, s.max, s.log_sum, T(1)};
}

// Rows of few classes (the article's 10 digits) go Vec::size() rows at a time,
// one lane per row: the max, the sum of exponentials and the log become vector
// operations across rows. Row by row they are two horizontal reductions and a
// scalar log, most of the time such a row takes.
constexpr int64_t kFewClasses = 32;

// forward_class_row of Vec::size() consecutive rows of x, written to out[lane].
template <typename T>
void forward_class_rows_few(const T* x, const int64_t* target, const Options<T>& o,
                            RowResult<T>* out) {
  using Vec = Vectorized<T>;
  using Index = Vectorized<at::vec::int_same_size_t<T>>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t n = o.classes;
  const Index row_starts = Index::arange(0, n);
  std::array<Vec, kFewClasses> column;  // column[c]: class c of each lane's row
  Vec max(-kInf<T>);
  for (int64_t c = 0; c < n; ++c) {
    column[c] = at::vec::gather<sizeof(T)>(x + c, row_starts);
    max = at::vec::maximum(max, column[c]);
  }
  const Vec inf(kInf<T>), minus_inf(-kInf<T>);
  // An all -inf row has max -inf: shift by 0 so that its sum is 0, not NaN.
  const Vec shift = Vec::blendv(max, Vec(T(0)), max == minus_inf);
  Vec sum(T(0));
  Vec gap(T(0));  // sum(w (max - x)), for the smoothing term
  for (int64_t c = 0; c < n; ++c) {
    sum = sum + (column[c] - shift).exp_u20();
    if (o.smoothing > T(0)) {
      const Vec diff = Vec::blendv(max - column[c], inf, column[c] == minus_inf);
      gap = at::vec::fmadd(Vec(class_weight(o, c)), diff, gap);
    }
  }
  T maxes[kLanes], log_sums[kLanes], gaps[kLanes];
  max.store(maxes);
  // A +inf logit makes x - max NaN, as in PyTorch (exp_u20 would give inf).
  Vec::blendv(sum.log(), Vec(std::numeric_limits<T>::quiet_NaN()), max == inf).store(log_sums);
  gap.store(gaps);
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const int64_t t = target[lane];
    if (t == o.ignore_index) {
      out[lane] = {T(0), T(0), T(0), T(0)};
      continue;
    }
    const RowStats<T> s{maxes[lane], static_cast<double>(log_sums[lane]), gaps[lane], T(0)};
    const T w_t = class_weight(o, t);
    out[lane] = {class_row_loss(s, x[lane * n + t], w_t, o), s.max, s.log_sum, w_t};
  }
}

// grad = scale * (a * softmax(x) - w * eps / C), then the target class gets
// -scale * (1 - eps) * w_t: the class-index form of sum(w q) softmax - w q.
template <typename T>
void backward_class_row(const T* x, T* grad, int64_t target, T max, T log_sum, T scale,
                        const Options<T>& o) {
  using Vec = Vectorized<T>;
  const int64_t n = o.classes;
  if (target == o.ignore_index) {
    std::fill(grad, grad + n, T(0));
    return;
  }
  const T w_t = class_weight(o, target);
  const bool smoothing = o.smoothing > T(0);
  const T eps_c = o.smoothing / T(n);
  // Without smoothing the class weights other than w_t take no part (a NaN among
  // them must not reach the gradient).
  T a = scale * ((T(1) - o.smoothing) * w_t + (smoothing ? eps_c * o.weight_sum : T(0)));
  // A NaN logit made the row's statistics NaN; exp_u20 would turn NaN into inf.
  if (std::isnan(max + log_sum)) a = std::numeric_limits<T>::quiet_NaN();
  const T b = scale * eps_c;
  // Read before the sweep, which may write the gradient over the logits.
  const T p_t = std::exp((x[target] - max) - log_sum);
  const Vec va(a), vb(b), vmax(max), vlog_sum(log_sum);
  // count = Vec::size() but for the last, partial vector: a masked one, not a
  // scalar loop of std::exp, which would cost rows of a few classes most of their time.
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Vec p = ((Vec::loadu(x + i, count) - vmax) - vlog_sum).exp_u20();
    // a p - b w with a single rounding of a p (fmsub): exact where the two cancel.
    const Vec g = smoothing ? at::vec::fmsub(va, p, o.weight == nullptr ? vb : vb * Vec::loadu(o.weight + i, count))
                            : va * p;
    g.store(grad + i, count);
  }
  // The target's own: c (p_t - 1) + b (W p_t - w_t) with c = scale (1 - eps) w_t, the
  // terms of a p_t - b w_t - c grouped so that they cancel where they should (p_t - 1
  // is exact for p_t near 1; a row of one class gets exactly 0).
  const T c = scale * (T(1) - o.smoothing) * w_t;
  grad[target] = c * (p_t - T(1)) + (smoothing ? b * (o.weight_sum * p_t - w_t) : T(0));
  if (std::isnan(a)) grad[target] = a;
}

template <typename T>
void backward_prob_row(const T* x, const T* q, T* grad, T max, T log_sum, T scale,
                       const Options<T>& o) {
  using Vec = Vectorized<T>;
  const int64_t n = o.classes;
  const TargetWeights<T> weights{q, o.weight, T(1) - o.smoothing, o.smoothing / T(n)};
  const int64_t full = n - n % Vec::size();
  // sum(w q), from the targets: forward's outputs do not carry it.
  Vec sums(T(0));
  for (int64_t i = 0; i < full; i += Vec::size()) sums = sums + weights.load(i);
  if (full < n) sums = sums + weights.load(full, n - full);
  T sum_wq = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, sums);
  // A NaN logit made the row's statistics NaN; exp_u20 would turn NaN into inf.
  if (std::isnan(max + log_sum)) sum_wq = std::numeric_limits<T>::quiet_NaN();
  const Vec vsum_wq(sum_wq), vmax(max), vlog_sum(log_sum), vscale(scale);
  // scale (sum(w q) p - w q), the difference rounded once (fmsub): where the target
  // is close to the softmax the two nearly cancel.
  for (int64_t i = 0; i < full; i += Vec::size()) {
    const Vec p = ((Vec::loadu(x + i) - vmax) - vlog_sum).exp_u20();
    (vscale * at::vec::fmsub(vsum_wq, p, weights.load(i))).store(grad + i);
  }
  if (full < n) {
    const int64_t count = n - full;
    const Vec p = ((Vec::loadu(x + full, count) - vmax) - vlog_sum).exp_u20();
    (vscale * at::vec::fmsub(vsum_wq, p, weights.load(full, count))).store(grad + full, count);
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

// The operands of forward and backward in the layout the kernels read.
struct Prepared {
  at::Tensor x;         // (R, C) contiguous
  at::Tensor target;    // (R,) int64 or (R, C) contiguous
  at::Tensor weight;    // (C,) contiguous, or undefined
  bool class_targets;
};

// Lays out checked arguments for the kernels, and checks the class indices
// (the op is public) before any kernel reads with them.
Prepared prepare(const char* op, const at::Tensor& input, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  Prepared p{input.contiguous(), target.contiguous(), at::Tensor(), !target.is_floating_point()};
  if (weight.has_value()) p.weight = weight->contiguous();
  if (p.class_targets) {
    const int64_t classes = input.size(1);
    const int64_t* t = p.target.data_ptr<int64_t>();
    for (int64_t r = 0; r < p.target.numel(); ++r) {
      TORCH_CHECK_INDEX(t[r] == ignore_index || (t[r] >= 0 && t[r] < classes), op,
                        ": target holds class index ", t[r], ", expected a value in [0, ",
                        classes, ") or ignore_index (", ignore_index, ")");
    }
  }
  return p;
}

// The options in the compute type calc_t; `weight_calc` holds the class
// weights converted to it (undefined without weights).
// `block_sums` receives the sum of the weights of each block of kBlock classes.
template <typename calc_t>
Options<calc_t> make_options(const Prepared& p, const at::Tensor& weight_calc, int64_t ignore_index,
                             double smoothing, std::vector<calc_t>& block_sums) {
  const int64_t classes = p.x.size(1);
  Options<calc_t> o;
  o.weight = weight_calc.defined() ? weight_calc.data_ptr<calc_t>() : nullptr;
  o.block_sums = nullptr;
  o.weight_sum = static_cast<calc_t>(classes);
  if (o.weight != nullptr) {
    double sum = 0;
    for (int64_t start = 0; start < classes; start += kBlock) {
      double block = 0;
      for (int64_t c = start; c < std::min(classes, start + kBlock); ++c) block += o.weight[c];
      block_sums.push_back(static_cast<calc_t>(block));
      sum += block;
    }
    o.block_sums = block_sums.data();
    o.weight_sum = static_cast<calc_t>(sum);
  }
  o.classes = classes;
  o.ignore_index = ignore_index;
  o.smoothing = static_cast<calc_t>(smoothing);
  return o;
}

template <typename calc_t>
at::Tensor weight_as(const Prepared& p) {
  return p.weight.defined() ? p.weight.to(c10::CppTypeToScalarType<calc_t>::value).contiguous() : at::Tensor();
}

// What forward computes per row, before the reduction.
struct ForwardRows {
  std::vector<double> losses, weights;
};

// The forward sweep of every row, computing in calc_t: the input's own type, or
// float for bfloat16/float16.
template <typename scalar_t, typename calc_t, typename acc_t>
ForwardRows forward_rows(const Prepared& p, int64_t ignore_index, double smoothing, acc_t* max_p,
                         acc_t* log_sum_p) {
  const int64_t rows = p.x.size(0);
  const int64_t classes = p.x.size(1);
  const at::Tensor weight_calc = weight_as<calc_t>(p);
  std::vector<calc_t> block_sums;
  const auto o = make_options<calc_t>(p, weight_calc, ignore_index, smoothing, block_sums);
  const scalar_t* xp = p.x.data_ptr<scalar_t>();
  const int64_t* tp = p.class_targets ? p.target.data_ptr<int64_t>() : nullptr;
  ForwardRows out{std::vector<double>(rows), std::vector<double>(rows)};
  const auto store = [&](int64_t r, const RowResult<calc_t>& res) {
    out.losses[r] = res.loss;
    max_p[r] = static_cast<acc_t>(res.max);
    log_sum_p[r] = static_cast<acc_t>(res.log_sum);
    out.weights[r] = res.weight;
  };
  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    std::vector<calc_t> x_scratch, q_scratch;
    int64_t r = begin;
    if (p.class_targets && classes <= kFewClasses) {
      constexpr int64_t kLanes = Vectorized<calc_t>::size();
      std::array<RowResult<calc_t>, kLanes> res;
      for (; r + kLanes <= end; r += kLanes) {
        // The block of kLanes rows as one "row" of kLanes * classes elements.
        const calc_t* block = row_as_acc<scalar_t, calc_t>(xp + r * classes, 0, kLanes * classes, x_scratch);
        forward_class_rows_few(block, tp + r, o, res.data());
        for (int64_t lane = 0; lane < kLanes; ++lane) store(r + lane, res[lane]);
      }
    }
    for (; r < end; ++r) {
      const calc_t* row = row_as_acc<scalar_t, calc_t>(xp, r, classes, x_scratch);
      store(r, p.class_targets
                   ? forward_class_row(row, tp[r], o)
                   : forward_prob_row(
                         row, row_as_acc<scalar_t, calc_t>(p.target.data_ptr<scalar_t>(), r, classes, q_scratch),
                         o));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy_forward";
  check_cross_entropy_inputs(op, input, target, weight, reduction, label_smoothing);
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  const int64_t rows = p.x.size(0);
  const auto acc_options = p.x.options().dtype(at::toOpMathType(p.x.scalar_type()));
  at::Tensor row_max = at::empty({rows}, acc_options);
  at::Tensor row_log_sum = at::empty({rows}, acc_options);
  at::Tensor total_weight = at::empty({}, acc_options);
  at::Tensor loss = at::empty(reduction == at::Reduction::None ? at::IntArrayRef{rows}
                                                               : at::IntArrayRef{},
                              p.x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        acc_t* max_p = row_max.data_ptr<acc_t>();
        acc_t* log_sum_p = row_log_sum.data_ptr<acc_t>();
        const ForwardRows res = forward_rows<scalar_t, acc_t>(p, ignore_index, label_smoothing, max_p, log_sum_p);
        // Summed serially, in double, so that the result does not depend on
        // the number of threads; R values cost nothing next to the R x C sweep.
        double loss_sum = 0, weight_sum = 0;
        for (int64_t r = 0; r < rows; ++r) {
          loss_sum += res.losses[r];
          weight_sum += res.weights[r];
        }
        total_weight.data_ptr<acc_t>()[0] = static_cast<acc_t>(weight_sum);
        scalar_t* loss_p = loss.data_ptr<scalar_t>();
        if (reduction == at::Reduction::None) {
          for (int64_t r = 0; r < rows; ++r) loss_p[r] = static_cast<scalar_t>(res.losses[r]);
        } else {
          // A mean over no weight is nan, as in PyTorch (whose nll term is 0 / 0
          // even where smoothing adds to the numerator).
          const double value = reduction == at::Reduction::Sum ? loss_sum
                               : weight_sum == 0           ? std::nan("")
                                                           : loss_sum / weight_sum;
          loss_p[0] = static_cast<scalar_t>(value);
        }
      });
  return {loss, row_max, row_log_sum, total_weight};
}

// The gradient of every row into `gp`, computing in calc_t: the input's own
// type, or float for bfloat16/float16.
template <typename scalar_t, typename calc_t>
void backward_rows(const Prepared& p, scalar_t* gp, const at::Tensor& row_max, const at::Tensor& row_log_sum,
                   const at::Tensor& row_scales, double common_scale, int64_t ignore_index, double smoothing) {
  const int64_t rows = p.x.size(0);
  const int64_t classes = p.x.size(1);
  constexpr auto calc_type = c10::CppTypeToScalarType<calc_t>::value;
  const at::Tensor weight_calc = weight_as<calc_t>(p);
  std::vector<calc_t> block_sums;
  const auto o = make_options<calc_t>(p, weight_calc, ignore_index, smoothing, block_sums);
  const at::Tensor max_c = row_max.to(calc_type).contiguous();
  const at::Tensor log_sum_c = row_log_sum.to(calc_type).contiguous();
  const at::Tensor scales_c = row_scales.defined() ? row_scales.to(calc_type).contiguous() : at::Tensor();
  const scalar_t* xp = p.x.data_ptr<scalar_t>();
  const calc_t* max_p = max_c.data_ptr<calc_t>();
  const calc_t* log_sum_p = log_sum_c.data_ptr<calc_t>();
  const calc_t* scale_p = scales_c.defined() ? scales_c.data_ptr<calc_t>() : nullptr;
  const calc_t scale_all = static_cast<calc_t>(common_scale);
  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    std::vector<calc_t> x_scratch, q_scratch, g_scratch;
    for (int64_t r = begin; r < end; ++r) {
      const calc_t* row = row_as_acc<scalar_t, calc_t>(xp, r, classes, x_scratch);
      calc_t* grad_row = grad_row_as_acc<scalar_t, calc_t>(gp, r, classes, g_scratch);
      const calc_t scale = scale_p ? scale_p[r] : scale_all;
      if (p.class_targets) {
        backward_class_row(row, grad_row, p.target.data_ptr<int64_t>()[r], max_p[r], log_sum_p[r], scale, o);
      } else {
        backward_prob_row(row,
                          row_as_acc<scalar_t, calc_t>(p.target.data_ptr<scalar_t>(), r, classes, q_scratch),
                          grad_row, max_p[r], log_sum_p[r], scale, o);
      }
      store_grad_row(grad_row, gp, r, classes);
    }
  });
}

// Writes the gradient of the loss w.r.t. the logits `p.x` into `grad_input`,
// which may be `p.x` itself: each row is read (widened into scratch where
// computed in another type) before its gradient is stored.
void backward_into(at::Tensor& grad_input, const Prepared& p, const at::Tensor& grad_loss,
                   const at::Tensor& row_max, const at::Tensor& row_log_sum,
                   const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                   double label_smoothing) {
  // The factor of each row's gradient: its upstream gradient with no reduction,
  // else one scalar (divided by the mean's divisor; nan for a divisor of 0).
  const at::Tensor row_scales = reduction == at::Reduction::None ? grad_loss : at::Tensor();
  double common_scale = 0;
  if (reduction != at::Reduction::None) {
    common_scale = grad_loss.item<double>();
    if (reduction == at::Reduction::Mean) {
      const double divisor = total_weight.item<double>();
      common_scale = divisor == 0 ? std::nan("") : common_scale / divisor;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.x.scalar_type(), "cross_entropy_backward_cpu", [&] {
        backward_rows<scalar_t, at::opmath_type<scalar_t>>(p, grad_input.data_ptr<scalar_t>(), row_max, row_log_sum, row_scales,
                                        common_scale, ignore_index, label_smoothing);
      });
}

at::Tensor cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy_backward";
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum,
                                      total_weight, reduction, label_smoothing);
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  at::Tensor grad_input = empty_large(p.x.sizes(), p.x.options());
  backward_into(grad_input, p, grad_loss, row_max, row_log_sum, total_weight, reduction,
                ignore_index, label_smoothing);
  return grad_input;
}

void cross_entropy_backward_inplace_cpu(
    const at::Tensor& grad_loss, at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& total_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy_backward_";
  check_cross_entropy_backward_inputs(op, grad_loss, input, target, weight, row_max, row_log_sum,
                                      total_weight, reduction, label_smoothing);
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous");
  const Prepared p = prepare(op, input, target, weight, ignore_index);
  backward_into(input, p, grad_loss, row_max, row_log_sum, total_weight, reduction, ignore_index,
                label_smoothing);
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_inplace_cpu);
}

}  // namespace myext
