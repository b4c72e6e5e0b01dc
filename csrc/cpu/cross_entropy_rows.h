// The CPU cross-entropy row kernels, shared by the cross_entropy ops
// (cross_entropy.cpp) and the fused linear_cross_entropy ops, which run them on
// each chunk of logits they compute (linear_cross_entropy.cpp).
//
// Each row of logits is read once from memory in forward (an online softmax
// over L1-sized blocks gives the max, the sum of exponentials and the loss
// terms together) and once in backward, which writes the gradient in the same
// sweep. Forward keeps two numbers per row for backward, the row's max and
// log(sum(exp(x - max))), never their rounded sum: softmax = exp((x - max) -
// log_sum) is then as precise as PyTorch's at any scale of the logits.
// bfloat16 and float16 rows are widened to float32 in a per-thread scratch row;
// so are rows that are soft-capped or tempered, z = cap(x) / temperature with
// cap(x) = softcap * tanh(x / softcap), first. Untempered, uncapped rows of the
// accumulation type are read where they lie: the common case copies nothing.
//
// The per-row quantities: with z the (capped, tempered) logits, q the target
// distribution after label smoothing (q = (1 - eps) target + eps / C, target
// one-hot for class indices), w the class weights (ones if none) and lambda
// the z-loss scale (lse_square_scale),
//   loss = sum_c w_c q_c (lse - z_c) + lambda lse^2
//        = sum(w q (max - z)) + sum(w q) log_sum + lambda lse^2,
//   d loss / d z = (sum(w q) + 2 lambda lse) softmax(z) - w q,
// times dz/dx = 1 / (cosh^2(x / softcap) temperature). Every term of sum(w q (max -
// z)) is >= 0, so it is summed without the cancellation that sum(w q) max -
// sum(w q z) would suffer for large logits.
// A sample weight s_r multiplies row r's loss, its share of the mean's divisor
// and its loss gradient. Forward can also give each row's entropy H = lse -
// sum(p z) = log_sum + B / S, S = sum(exp(z - max)) and B = sum(exp(z - max)
// (max - z)), whose terms are all >= 0 like the gap sum's; backward can add the
// gradients of the target's log-probability and of H, upstream factors g_lp and
// g_H of their own (not times s_r):
//   g_lp (onehot_t - p) - g_H p ((z - max) + (H - log_sum)).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../loss_options.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace myext {
namespace ce {

using at::vec::Vectorized;

// Elements per block of the online softmax: small enough that the second
// look at a block (the exponentials) hits L1.
constexpr int64_t kBlock = 2048;

inline int64_t rows_per_task(int64_t classes) {
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
  constexpr int64_t kStep = 4 * Vec::size();
  // Four running maxima: one would chain every vector's max (and its NaN test)
  // on the one before, and the loop would wait on that chain, not on its loads.
  Vec m0(-kInf<T>), m1(-kInf<T>), m2(-kInf<T>), m3(-kInf<T>);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));  // propagates NaN
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + Vec::size()));
    m2 = at::vec::maximum(m2, Vec::loadu(x + i + 2 * Vec::size()));
    m3 = at::vec::maximum(m3, Vec::loadu(x + i + 3 * Vec::size()));
  }
  Vec vmax = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  for (; i + Vec::size() <= n; i += Vec::size()) {
    vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  }
  T m = at::vec::vec_reduce_all<T>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

// exp(x) for x <= 0 (a logit less its row's max, or that less the log-sum) or
// NaN, which it keeps; exp(-inf) = 0. The exponentials are most of a cross-entropy
// pass. On AVX-512 and AVX2 this is exp_u20's polynomial (Vectorized's fast exp, as
// ATen's softmax kernels use; the 1-ulp exp is far slower) with a range reduction
// that takes ln 2 in two parts (Cody and Waite) and a power of two that is right
// down to the subnormals: within 2 ulp over every x whose exp is a normal float
// (docs/BENCHMARKS.md). exp_u20 itself is within 4.5 ulp down to x = -80 but 11.8
// million ulp off at x = -86.99, where exp leaves the normal range. float64 and the
// default ISA's build keep exp_u20.
template <typename T>
inline Vectorized<T> exp_nonpositive(const Vectorized<T>& x) {
  return x.exp_u20();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// exp_u20's coefficients, for exp(r) on |r| <= ln(2) / 2, and the two parts of ln 2.
constexpr float kExpC1 = 0.999999701f, kExpC2 = 0.499991506f, kExpC3 = 0.166676521f, kExpC4 = 0.0418978221f,
                kExpC5 = 0.00828929059f;
constexpr float kLog2E = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
// Below it, 2^n (n <= -217) times the polynomial is 0 in float; the clamp also makes
// -inf finite, where r = x - n ln 2 would be -inf + inf.
constexpr float kExpFloor = -150.0f;

// exp(r) by exp_u20's polynomial, for x = n ln 2 + r (the reduction in two parts),
// the part both vector builds share.
inline Vectorized<float> exp_reduced(const Vectorized<float>& x, const Vectorized<float>& n) {
  using Vec = Vectorized<float>;
  const Vec r = at::vec::fmadd(n, Vec(-kLn2Low), at::vec::fmadd(n, Vec(-kLn2High), x));
  Vec p = at::vec::fmadd(r, Vec(kExpC5), Vec(kExpC4));
  p = at::vec::fmadd(r, p, Vec(kExpC3));
  p = at::vec::fmadd(r, p, Vec(kExpC2));
  p = at::vec::fmadd(r, p, Vec(kExpC1));
  return at::vec::fmadd(r, p, Vec(1.0f));
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& x) {
  // max_ps returns its second operand when either is NaN: a NaN x stays NaN (and
  // costs no NaN blend, as at::vec::maximum would).
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(kExpFloor), x);
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // p 2^n, rounded once, also where it is subnormal or 0.
  return _mm512_scalef_ps(exp_reduced(v, n), n);
}
#elif defined(CPU_CAPABILITY_AVX2)
// AVX2 has no vscalefps, and building 2^n from a rounded n (round, convert, and two
// integer powers of two for the subnormals) took more instructions than the
// polynomial: on 8 lanes the exponential was compute-bound at about 1.6 times the
// AVX-512 build's time per element. Here n and 2^n come from one fma: adding
// 1.5 * 2^23 rounds y = v log2(e) to an integer n in the low bits of t, biased so
// that t << 23 is the float 2^(n + kPowBias) (n + kPowBias >= -116: always normal).
// The polynomial is computed 2^-kPowBias times too small, coefficients and all, a
// scaling by a power of two that changes none of its roundings (every value stays a
// normal float), so one product gives p 2^n, rounded once, also where it is subnormal or 0.
constexpr int kPowBias = 100;
constexpr float kRoundShift = 12582912.0f + 127.0f + kPowBias;  // 1.5 * 2^23, plus the exponent's bias
constexpr float kPolyScale = 0x1p-100f;                         // 2^-kPowBias
template <>
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& x) {
  const __m256 v = _mm256_max_ps(_mm256_set1_ps(kExpFloor), x);  // NaN stays, as above
  const __m256 t = _mm256_fmadd_ps(v, _mm256_set1_ps(kLog2E), _mm256_set1_ps(kRoundShift));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kRoundShift));  // exact
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Low), _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2High), v));
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(kExpC5 * kPolyScale), _mm256_set1_ps(kExpC4 * kPolyScale));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kExpC3 * kPolyScale));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kExpC2 * kPolyScale));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kExpC1 * kPolyScale));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kPolyScale));
  // A NaN lane's t gives some power of two; p is NaN there.
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}
#endif
#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2

// sum(exp(x - shift)) over n elements (x <= shift), in double across blocks; while
// it computes, the first `ahead` elements from `next` (the next block) are fetched
// into L2, so that memory streams during the exponentials instead of after them.
template <typename T>
double sum_exp(const T* x, int64_t n, T shift, const T* next = nullptr, int64_t ahead = 0) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    if (i < ahead) __builtin_prefetch(next + i, /*rw=*/0, /*locality (2: L2)=*/2);
    acc = acc + exp_nonpositive(Vec::loadu(x + i) - vshift);
  }
  if (i < n) {
    // Lanes past the end load -inf and add exp(-inf) = 0.
    Vec tail(-kInf<T>);
    Vec partial = Vec::loadu(x + i, n - i);
    tail = Vec::set(tail, partial, n - i);
    acc = acc + exp_nonpositive(tail - vshift);
  }
  // The lanes added in double: a row whose largest term is 1 and the rest small (a
  // confident prediction) keeps the digits of those, which its loss log(1 + small) is.
  T lanes[Vec::size()];
  acc.store(lanes);
  double total = 0;
  for (int64_t lane = 0; lane < Vec::size(); ++lane) total += lanes[lane];
  return total;
}

// sum_exp's sum and, with it, the entropy's sum(exp(x - shift) (shift - x)), both
// in double across blocks. A -inf logit's term is 0 (its probability is 0), not
// 0 * inf; it is masked, as are the lanes past the end.
template <typename T>
std::array<double, 2> sum_exp_entropy(const T* x, int64_t n, T shift, const T* next = nullptr, int64_t ahead = 0) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift), zero(T(0)), minus_inf(-kInf<T>);
  Vec acc(T(0)), gaps(T(0));
  const auto add = [&](const Vec& xv) {
    const Vec e = exp_nonpositive(xv - vshift);
    acc = acc + e;
    gaps = at::vec::fmadd(e, Vec::blendv(vshift - xv, zero, xv == minus_inf), gaps);
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    if (i < ahead) __builtin_prefetch(next + i, /*rw=*/0, /*locality (2: L2)=*/2);
    add(Vec::loadu(x + i));
  }
  if (i < n) add(Vec::set(minus_inf, Vec::loadu(x + i, n - i), n - i));
  T lanes[Vec::size()], gap_lanes[Vec::size()];
  acc.store(lanes);
  gaps.store(gap_lanes);
  double total = 0, gap = 0;
  for (int64_t lane = 0; lane < Vec::size(); ++lane) {
    total += lanes[lane];
    gap += gap_lanes[lane];
  }
  return {total, gap};
}

// Raises IndexError, naming the op, for a class index outside [0, classes)
// that is not ignore_index: checked before any kernel reads with them.
inline void check_class_indices(const char* op, const int64_t* target, int64_t rows, int64_t classes,
                                int64_t ignore_index) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(target[r] == ignore_index || (target[r] >= 0 && target[r] < classes), op,
                      ": target holds class index ", target[r], ", expected a value in [0, ", classes,
                      ") or ignore_index (", ignore_index, ")");
  }
}

// The options of one call, in the compute type T.
template <typename T>
struct Options {
  const T* weight;      // nullptr: every class weighs 1
  const T* block_sums;  // the sum of the weights of each block of kBlock classes
  T weight_sum;         // sum of the class weights (C without weights)
  int64_t classes;      // C, of which each row holds `columns` from class_start on
  int64_t columns;
  int64_t class_start;
  int64_t ignore_index;
  T smoothing;
  T z_loss;             // lambda
  T softcap;            // 0: none
  T inv_temperature;    // 1 / temperature; 1: none. z is multiplied by it, a
                        // product per logit where a division would be several times dearer.
  // Both as given, for the cap, which computes float32 in double: T's own would
  // round them before z is rounded.
  double softcap_exact;
  double inv_temperature_exact;
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

// A row's statistics: max, log(sum(exp(x - max))), with weights v the gap
// sum(v (max - x)) and sum(v), and where asked the entropy of softmax(x).
template <typename T>
struct RowStats {
  T max;
  double log_sum;
  T gap = 0;
  T weight = 0;
  double entropy = 0;
};

struct NoWeights {};

// One pass over the row from memory: each block is reduced for its max, then
// summed from L1 against the running max (fetching the next block meanwhile),
// rescaling the running sums when the max grows. A NaN logit makes the max NaN,
// and with it everything after. kEntropy (a template argument, so that the loop
// without it is the same code as ever) also sums the entropy's B.
template <typename T, typename Weights, bool kEntropy = false>
RowStats<T> row_stats(const T* x, int64_t n, const Weights& weights) {
  constexpr bool kGap = !std::is_same_v<Weights, NoWeights>;
  T running_max = -kInf<T>;
  double running_sum = 0;
  double entropy_gap = 0;  // B = sum(exp(x - max) (max - x)), against the running max
  T gap = 0;
  T seen_weight = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const T block_max = hmax(x + start, len);
    if (!(block_max <= running_max)) {
      // (Empty running sums need no rescaling: short rows skip an exp.)
      if (running_sum != 0) {
        const double rescale = std::exp(static_cast<double>(running_max) - block_max);
        // Each term of B grows by its exp(x - max) times the max's step, before both shrink.
        if constexpr (kEntropy) {
          entropy_gap = rescale * (entropy_gap + running_sum * (static_cast<double>(block_max) - running_max));
        }
        running_sum *= rescale;
      }
      if constexpr (kGap) {
        if (seen_weight != T(0)) gap += seen_weight * (block_max - running_max);
      }
      running_max = block_max;
    }
    // While every logit so far is -inf, exp(x - 0) adds the zeros it should.
    const int64_t next_len = std::clamp<int64_t>(n - start - kBlock, 0, kBlock);
    const T shift = running_max == -kInf<T> ? T(0) : running_max;
    if constexpr (kEntropy) {
      const auto [block_sum, block_entropy_gap] = sum_exp_entropy(x + start, len, shift, x + start + len, next_len);
      running_sum += block_sum;
      entropy_gap += block_entropy_gap;
    } else {
      running_sum += sum_exp(x + start, len, shift, x + start + len, next_len);
    }
    if constexpr (kGap) {
      const auto [block_gap, block_weight] = weighted_gap(x + start, len, running_max, weights, start);
      gap += block_gap;
      seen_weight += block_weight;
    }
  }
  // A +inf logit makes x - max NaN, as in PyTorch (exp_u20 would give inf).
  const double log_sum = running_max == kInf<T> ? std::nan("") : std::log(running_sum);
  // H = log S + B / S: both terms >= 0, nothing cancels. (A row of -inf only: NaN.)
  const double entropy = kEntropy ? log_sum + entropy_gap / running_sum : 0.0;
  return {running_max, log_sum, gap, seen_weight, entropy};
}

// The loss of a row with class-index target t (not ignored): the target's
// term, plus with smoothing eps / C sum_c w_c (lse - z_c), plus the z-loss. In
// double: the terms are rounded once, into the loss.
template <typename T>
double class_row_loss(const RowStats<T>& s, T z_target, T w_target, const Options<T>& o) {
  const double gap_target = static_cast<double>(s.max) - z_target;
  double loss = (1.0 - o.smoothing) * w_target * (gap_target + s.log_sum);
  if (o.smoothing > T(0)) {
    loss += static_cast<double>(o.smoothing) / o.classes * (s.gap + static_cast<double>(o.weight_sum) * s.log_sum);
  }
  return loss;
}

template <typename T>
double z_loss(const RowStats<T>& s, const Options<T>& o) {
  if (o.z_loss == T(0)) return 0;
  const double lse = s.max + s.log_sum;
  return o.z_loss * lse * lse;
}

// What forward writes for a row.
template <typename T>
struct RowResult {
  double loss;
  T max;
  double log_sum;
  T target_logit;  // the target's (capped, tempered) logit, for the token accuracy
  T weight;        // the row's share of the mean's divisor (before its sample weight)
  double entropy;  // where forward is asked for it (0 for ignored rows)
};

// Ignored rows skip the sweep: their max and log_sum are never read.
template <typename T, bool kEntropy = false>
RowResult<T> forward_class_row(const T* z, int64_t target, const Options<T>& o) {
  if (target == o.ignore_index) return {0.0, T(0), 0.0, T(0), T(0), 0.0};
  const RowStats<T> s =
      o.smoothing <= T(0)   ? row_stats<T, NoWeights, kEntropy>(z, o.classes, NoWeights{})
      : o.weight == nullptr ? row_stats<T, Ones<T>, kEntropy>(z, o.classes, Ones<T>{})
                            : row_stats<T, ClassWeights<T>, kEntropy>(z, o.classes,
                                                                      ClassWeights<T>{o.weight, o.block_sums});
  const T w_t = class_weight(o, target);
  return {class_row_loss(s, z[target], w_t, o) + z_loss(s, o), s.max, s.log_sum, z[target], w_t, s.entropy};
}

template <typename T, bool kEntropy = false>
RowResult<T> forward_prob_row(const T* z, const T* q, const Options<T>& o) {
  const TargetWeights<T> weights{q, o.weight, T(1) - o.smoothing, o.smoothing / T(o.classes)};
  const RowStats<T> s = row_stats<T, TargetWeights<T>, kEntropy>(z, o.classes, weights);
  // s.weight is sum(w q).
  return {s.gap + static_cast<double>(s.weight) * s.log_sum + z_loss(s, o), s.max, s.log_sum, T(0), T(1),
          s.entropy};
}

// Rows of few classes (the article's 10 digits) go Vec::size() rows at a time,
// one lane per row: the max, the sum of exponentials and the log become vector
// operations across rows. Row by row they are two horizontal reductions and a
// scalar log, most of the time such a row takes.
constexpr int64_t kFewClasses = 32;

// forward_class_row of Vec::size() consecutive rows of z, written to out[lane].
// The max is known before the sums here, so B needs no rescaling.
template <typename T, bool kEntropy = false>
void forward_class_rows_few(const T* z, const int64_t* target, const Options<T>& o, RowResult<T>* out) {
  using Vec = Vectorized<T>;
  using Index = Vectorized<at::vec::int_same_size_t<T>>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t n = o.classes;
  const Index row_starts = Index::arange(0, n);
  std::array<Vec, kFewClasses> column;  // column[c]: class c of each lane's row
  Vec max(-kInf<T>);
  for (int64_t c = 0; c < n; ++c) {
    column[c] = at::vec::gather<sizeof(T)>(z + c, row_starts);
    max = at::vec::maximum(max, column[c]);
  }
  const Vec inf(kInf<T>), minus_inf(-kInf<T>);
  // An all -inf row has max -inf: shift by 0 so that its sum is 0, not NaN.
  const Vec shift = Vec::blendv(max, Vec(T(0)), max == minus_inf);
  Vec sum(T(0));
  Vec gap(T(0));          // sum(w (max - z)), for the smoothing term
  Vec entropy_gap(T(0));  // B = sum(exp(z - max) (max - z)), 0 for z = -inf
  const Vec zero(T(0));
  for (int64_t c = 0; c < n; ++c) {
    const Vec e = exp_nonpositive(column[c] - shift);
    sum = sum + e;
    if constexpr (kEntropy) {
      entropy_gap = at::vec::fmadd(e, Vec::blendv(max - column[c], zero, column[c] == minus_inf), entropy_gap);
    }
    if (o.smoothing > T(0)) {
      const Vec diff = Vec::blendv(max - column[c], inf, column[c] == minus_inf);
      gap = at::vec::fmadd(Vec(class_weight(o, c)), diff, gap);
    }
  }
  T maxes[kLanes], log_sums[kLanes], gaps[kLanes], entropies[kLanes];
  max.store(maxes);
  // A +inf logit makes z - max NaN, as in PyTorch (exp_u20 would give inf).
  const Vec log_sum = Vec::blendv(sum.log(), Vec(std::numeric_limits<T>::quiet_NaN()), max == inf);
  log_sum.store(log_sums);
  gap.store(gaps);
  if constexpr (kEntropy) (log_sum + entropy_gap / sum).store(entropies);
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const int64_t t = target[lane];
    if (t == o.ignore_index) {
      out[lane] = {0.0, T(0), 0.0, T(0), T(0), 0.0};
      continue;
    }
    const RowStats<T> s{maxes[lane], static_cast<double>(log_sums[lane]), gaps[lane], T(0)};
    const T w_t = class_weight(o, t);
    const T z_t = z[lane * n + t];
    out[lane] = {class_row_loss(s, z_t, w_t, o) + z_loss(s, o), s.max, s.log_sum, z_t, w_t,
                 kEntropy ? static_cast<double>(entropies[lane]) : 0.0};
  }
}

// A row's extras in backward: the upstream gradients of the target's
// log-probability (0: none) and of the entropy, and H - log_sum of the whole row,
// so that z - (lse - H) = -((max - z) - entropy_shift) keeps the digits of the
// gap max - z. The entropy's terms are added only with kEntropy (a template
// argument: rows without it run the loop they always ran).
template <typename T>
struct RowExtraGrads {
  T logprob = 0;
  T entropy = 0;
  T entropy_shift = 0;
};

// -g_H p (z - E) = g_H p ((max - z) - (H - log_sum)); 0 where p = 0 (a -inf logit's
// max - z is inf, and 0 * inf would be NaN).
template <typename T>
Vectorized<T> entropy_grad(const Vectorized<T>& p, const Vectorized<T>& z, T max, const RowExtraGrads<T>& e) {
  using Vec = Vectorized<T>;
  const Vec g = (Vec(e.entropy) * p) * ((Vec(max) - z) - Vec(e.entropy_shift));
  return Vec::blendv(g, Vec(T(0)), p == Vec(T(0)));
}

template <typename T>
T entropy_grad(T p, T z, T max, const RowExtraGrads<T>& e) {
  return p == T(0) ? T(0) : (e.entropy * p) * ((max - z) - e.entropy_shift);
}

// d loss / d z of a row with class-index target t: scale * (a softmax(z) - b w)
// with a = (1 - eps) w_t + eps / C W + 2 lambda lse and b = eps / C, and at the
// target class -scale (1 - eps) w_t more. The row holds the columns of classes
// [class_start, class_start + columns); t may be outside them (a row of a shard
// that does not hold its target), and then `row_weight`, sum(w q) =
// (1 - eps) w_t + eps / C W over every class, gives a (else it is null).
// The extras add g_lp (onehot_t - p): -g_lp joins a, and the target's c - g_lp
// keeps the expm1 grouping; and the entropy's term (entropy_grad) with kEntropy.
template <typename T, bool kEntropy = false>
void backward_class_row(const T* z, T* grad, int64_t target, T max, T log_sum, T scale, const Options<T>& o,
                        const T* row_weight = nullptr, const RowExtraGrads<T>& extra = {}) {
  using Vec = Vectorized<T>;
  const int64_t n = o.columns;
  if (target == o.ignore_index) {
    std::fill(grad, grad + n, T(0));
    return;
  }
  const int64_t local = target - o.class_start;
  const bool holds_target = local >= 0 && local < n;
  const T w_t = holds_target ? class_weight(o, local) : T(0);
  const bool smoothing = o.smoothing > T(0);
  const T eps_c = o.smoothing / T(o.classes);
  // scale 2 lambda lse: the z-loss's coefficient of the softmax.
  const T z_coef = o.z_loss == T(0) ? T(0) : scale * T(2) * o.z_loss * (max + log_sum);
  // Without smoothing the class weights other than w_t take no part (a NaN among
  // them must not reach the gradient).
  // (Without a grad_logprob, a - 0 is a, to the bit.)
  T a = (row_weight != nullptr ? scale * *row_weight + z_coef
                               : scale * ((T(1) - o.smoothing) * w_t + (smoothing ? eps_c * o.weight_sum : T(0))) +
                                     z_coef) -
        extra.logprob;
  // A NaN logit made the row's statistics NaN; exp_u20 would turn NaN into inf.
  if (std::isnan(max + log_sum)) a = std::numeric_limits<T>::quiet_NaN();
  const T b = scale * eps_c;
  // Read before the sweep, which may write the gradient over the logits.
  const T z_t = holds_target ? z[local] : T(0);
  const T p_t = std::exp((z_t - max) - log_sum);
  const T p_t_minus_1 = std::expm1((z_t - max) - log_sum);
  const Vec va(a), vb(b), vmax(max), vlog_sum(log_sum);
  // count = Vec::size() but for the last, partial vector: a masked one, not a
  // scalar loop of std::exp, which would cost rows of a few classes most of their time.
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Vec zv = Vec::loadu(z + i, count);
    const Vec p = exp_nonpositive((zv - vmax) - vlog_sum);
    // a p - b w with a single rounding of a p (fmsub): exact where the two cancel.
    Vec g = smoothing ? at::vec::fmsub(va, p, o.weight == nullptr ? vb : vb * Vec::loadu(o.weight + i, count))
                      : va * p;
    if constexpr (kEntropy) g = g + entropy_grad(p, zv, max, extra);
    g.store(grad + i, count);
  }
  // The target's own: c (p_t - 1) + b (W p_t - w_t) + z_coef p_t with c = scale
  // (1 - eps) w_t: the terms grouped so that they cancel where they should (p_t - 1
  // as expm1, exact for p_t near 1; a row of one class gets exactly 0).
  if (!holds_target) return;
  const T c = scale * (T(1) - o.smoothing) * w_t - extra.logprob;
  grad[local] = c * p_t_minus_1 + (smoothing ? b * (o.weight_sum * p_t - w_t) : T(0)) + z_coef * p_t;
  if constexpr (kEntropy) grad[local] += entropy_grad(p_t, z_t, max, extra);
  if (std::isnan(a)) grad[local] = a;
}

// sum(w q) over a row's n columns of probability targets (smoothed, weighted), in
// the one order of summation that backward_prob_row and a caller splitting the row
// into blocks of classes (which passes it back as the row's weight) both take.
template <typename T>
T target_weight_sum(const TargetWeights<T>& weights, int64_t n) {
  using Vec = Vectorized<T>;
  const int64_t full = n - n % Vec::size();
  Vec sums(T(0));
  for (int64_t i = 0; i < full; i += Vec::size()) sums = sums + weights.load(i);
  if (full < n) sums = sums + weights.load(full, n - full);
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, sums);
}

// The same for probability targets q (the row's columns of them); `row_weight`,
// where given, is sum(w q) over every class, which a row of a shard does not hold.
// Of the extras only the entropy's applies (no one target, no log-probability).
template <typename T, bool kEntropy = false>
void backward_prob_row(const T* z, const T* q, T* grad, T max, T log_sum, T scale, const Options<T>& o,
                       const T* row_weight = nullptr, const RowExtraGrads<T>& extra = {}) {
  using Vec = Vectorized<T>;
  const int64_t n = o.columns;
  const TargetWeights<T> weights{q, o.weight, T(1) - o.smoothing, o.smoothing / T(o.classes)};
  const int64_t full = n - n % Vec::size();
  // sum(w q), from the targets where not given: forward's outputs do not carry it.
  T sum_wq = row_weight != nullptr ? *row_weight : target_weight_sum(weights, n);
  // A NaN logit made the row's statistics NaN; exp_u20 would turn NaN into inf.
  if (std::isnan(max + log_sum)) sum_wq = std::numeric_limits<T>::quiet_NaN();
  // The z-loss's term, scale 2 lambda lse softmax, added apart: folded into sum(w q) it
  // would carry the rounding of 1 + 2 lambda lse where the rest cancels to nearly 0.
  const T z_coef = o.z_loss == T(0) ? T(0) : scale * T(2) * o.z_loss * (max + log_sum);
  const Vec vsum_wq(sum_wq), vmax(max), vlog_sum(log_sum), vscale(scale), vz_coef(z_coef);
  // scale (sum(w q) p - w q), the difference rounded once (fmsub): where the target is
  // close to the softmax the two nearly cancel.
  const auto grad_of = [&](const Vec& p, const Vec& wq, const Vec& zv) {
    Vec g = vscale * at::vec::fmsub(vsum_wq, p, wq);
    if (z_coef != T(0)) g = at::vec::fmadd(vz_coef, p, g);
    if constexpr (kEntropy) g = g + entropy_grad(p, zv, max, extra);
    return g;
  };
  for (int64_t i = 0; i < full; i += Vec::size()) {
    const Vec zv = Vec::loadu(z + i);
    const Vec p = exp_nonpositive((zv - vmax) - vlog_sum);
    grad_of(p, weights.load(i), zv).store(grad + i);
  }
  if (full < n) {
    const int64_t count = n - full;
    const Vec zv = Vec::loadu(z + full, count);
    const Vec p = exp_nonpositive((zv - vmax) - vlog_sum);
    grad_of(p, weights.load(full, count), zv).store(grad + full, count);
  }
}

// z = softcap * tanh(x / softcap) over n elements, into z (which may be x), and
// where `slope` is given dz/dx = 1 / cosh^2(x / softcap) into it. Both come from one
// exponential of a = -2 |x| / softcap, e = exp(a), a third of the cost of the
// vectorised tanh: tanh |y| = (1 - e) / (1 + e) and the slope 4 e / (1 + e)^2. Where
// e >= 1/2 (|y| small) 1 - e would cancel, so m = expm1(a) stands in: 1 - e = -m and
// e = 1 + m, both exact there; where e < 1/2, exp(a) itself keeps the digits of e
// that 1 + m would lose. The slope never takes 1 - tanh^2, which loses all of its
// digits where tanh is within rounding of 1.
// `multiplier` is softcap / temperature and `slope_multiplier` 1 / temperature (a
// product by 1 is exact: untempered, the results are those of softcap and no factor).
template <typename T>
void cap_rows(const T* x, T* z, T* slope, int64_t n, T multiplier, T minus_two_over_cap, T slope_multiplier) {
  using Vec = Vectorized<T>;
  const Vec vmultiplier(multiplier), vslope_multiplier(slope_multiplier), vminus_two_over_cap(minus_two_over_cap);
  const Vec minus_ln2(-std::log(T(2))), one(T(1)), four(T(4));
  constexpr int kAllLanes = (1 << Vec::size()) - 1;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Vec xv = Vec::loadu(x + i, count);
    const Vec a = xv.abs() * vminus_two_over_cap;
    // zero_mask of a comparison: a bit for each lane where it is false. Each branch
    // takes only the exponential its lanes need, both where the vector straddles.
    const int large = (a >= minus_ln2).zero_mask();
    Vec e, one_minus_e;
    if (large != kAllLanes) {
      const Vec m = a.expm1();
      e = one + m;
      one_minus_e = -m;
    }
    if (large != 0) {
      const Vec e_large = a.exp();
      const Vec is_small = a >= minus_ln2;
      e = large == kAllLanes ? e_large : Vec::blendv(e_large, e, is_small);
      one_minus_e = large == kAllLanes ? one - e_large : Vec::blendv(one - e_large, one_minus_e, is_small);
    }
    const Vec d = one + e;
    (vmultiplier * (one_minus_e / d).copysign(xv)).store(z + i, count);
    if (slope != nullptr) (vslope_multiplier * (four * e / (d * d))).store(slope + i, count);
  }
}

// float64: as it always was (softcap and inv_temperature as the caller gave them).
inline void cap(const double* x, double* z, double* slope, int64_t n, double softcap, double inv_temperature) {
  cap_rows<double>(x, z, slope, n, softcap * inv_temperature, -2 / softcap, inv_temperature);
}

// float32 (and bfloat16 and float16, widened to it) in double, z and the slope each
// rounded once to float32: correctly rounded but where the double result lies within
// a few of its ulps of a float32 tie. In float32 itself the roundings of x / softcap,
// the exponential, 1 - e, 1 + e, the quotient and the product by softcap added up to
// 4.5 ulps of z (torch.tanh's: 2), and the argument's rounding, amplified |a|-fold by
// exp, to tens of ulps of the slope far out: z's rounding moves the softmax, and with
// it the gradient, past twice PyTorch's error.
// One exponential, exp(a), serves every lane: double's 1 - e, exact but for e's own
// rounding (2^-53 absolute), keeps 2^-46 of the quotient's relative precision down to
// |a| = 2^-7, and below that the series y - y^3/3 + 2 y^5/15 - 17 y^7/315 (the first
// term left out, 0.022 y^9, is under 2^-69 of it) stands in. The float32 cap's
// scheme, expm1 and exp both wherever a vector straddles |a| = ln 2, doubled the capped
// forward's time in double; this adds about a tenth to it. Blocks of kBlock stay in L1.
inline void cap(const float* x, float* z, float* slope, int64_t n, double softcap, double inv_temperature) {
  using Vec = Vectorized<double>;
  constexpr int64_t kBlock = 256;
  alignas(64) double xd[kBlock], zd[kBlock], sd[kBlock];
  const Vec multiplier(softcap * inv_temperature), slope_multiplier(inv_temperature);
  const Vec minus_two_over_cap(-2 / softcap), minus_half(-0.5), one(1.0), four(4.0);
  const Vec series_from(-1.0 / 128), c3(-1.0 / 3), c5(2.0 / 15), c7(-17.0 / 315);
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t count = std::min(kBlock, n - i);
    for (int64_t j = 0; j < count; ++j) xd[j] = static_cast<double>(x[i + j]);
    for (int64_t j = 0; j < count; j += Vec::size()) {
      const int64_t lanes = std::min<int64_t>(Vec::size(), count - j);
      const Vec xv = Vec::loadu(xd + j, lanes);
      const Vec a = xv.abs() * minus_two_over_cap;
      const Vec e = a.exp();
      const Vec r = one / (one + e);
      const Vec y = a * minus_half, y2 = y * y;
      const Vec series = at::vec::fmadd(y * y2, at::vec::fmadd(y2, at::vec::fmadd(y2, c7, c5), c3), y);
      const Vec t = Vec::blendv((one - e) * r, series, a > series_from);
      (multiplier * t.copysign(xv)).store(zd + j, lanes);
      if (slope != nullptr) (slope_multiplier * ((four * e) * (r * r))).store(sd + j, lanes);
    }
    for (int64_t j = 0; j < count; ++j) z[i + j] = static_cast<float>(zd[j]);
    if (slope != nullptr) {
      for (int64_t j = 0; j < count; ++j) slope[i + j] = static_cast<float>(sd[j]);
    }
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

// z = x / temperature into z (which may be x).
template <typename T>
void temper(const T* x, T* z, int64_t n, T inv_temperature) {
  using Vec = Vectorized<T>;
  at::vec::map<T>([v = Vec(inv_temperature)](Vec a) { return a * v; }, z, x, n);
}

// Rows r of `src` (n elements each, count of them) as the compute type T, capped
// and tempered where the options ask: the rows themselves where nothing is to be
// done, else a copy in `scratch`.
template <typename scalar_t, typename T>
const T* rows_as_calc(const scalar_t* src, int64_t r, int64_t n, int64_t count, std::vector<T>& scratch,
                      const Options<T>& o) {
  const T* rows = row_as_acc<scalar_t, T>(src + r * n, 0, count * n, scratch);
  if (o.softcap == T(0) && o.inv_temperature == T(1)) return rows;
  scratch.resize(count * n);
  if (o.softcap != T(0)) {
    cap(rows, scratch.data(), static_cast<T*>(nullptr), count * n, o.softcap_exact, o.inv_temperature_exact);
  } else {
    temper(rows, scratch.data(), count * n, o.inv_temperature);
  }
  return scratch.data();
}

// The options for rows of `classes` logits, in T; `weight` (C), in any floating
// dtype or undefined, is converted into `weight_storage`, and `block_sums`
// receives the sum of its weights over each block of kBlock classes.
template <typename T>
Options<T> make_options(int64_t classes, const at::Tensor& weight, const LossOptions& options,
                        at::Tensor& weight_storage, std::vector<T>& block_sums) {
  Options<T> o;
  o.weight = nullptr;
  o.block_sums = nullptr;
  o.weight_sum = static_cast<T>(classes);
  if (weight.defined()) {
    weight_storage = weight.to(c10::CppTypeToScalarType<T>::value).contiguous();
    o.weight = weight_storage.data_ptr<T>();
    double sum = 0;
    for (int64_t start = 0; start < classes; start += kBlock) {
      double block = 0;
      for (int64_t c = start; c < std::min(classes, start + kBlock); ++c) block += o.weight[c];
      block_sums.push_back(static_cast<T>(block));
      sum += block;
    }
    o.block_sums = block_sums.data();
    o.weight_sum = static_cast<T>(sum);
  }
  o.classes = classes;
  o.columns = classes;
  o.class_start = 0;
  o.ignore_index = options.ignore_index;
  o.smoothing = static_cast<T>(options.label_smoothing);
  o.z_loss = static_cast<T>(options.lse_square_scale);
  o.softcap = static_cast<T>(options.softcap);
  o.inv_temperature = static_cast<T>(1.0 / options.temperature);
  o.softcap_exact = options.softcap;
  o.inv_temperature_exact = 1.0 / options.temperature;
  return o;
}

// A block of rows of logits and their targets, contiguous.
template <typename scalar_t>
struct Rows {
  const scalar_t* x;            // (rows, classes)
  int64_t rows;
  int64_t classes;
  const int64_t* class_target;  // (rows,), or null
  const scalar_t* prob_target;  // (rows, classes), or null
};

// Where forward writes each row's results (acc_t: the input's accumulation type).
template <typename acc_t>
struct ForwardOut {
  double* loss;
  acc_t* max;
  acc_t* log_sum;
  acc_t* target_logit;
  double* weight;
  acc_t* entropy;  // null unless the options ask for it
};

// The forward sweep of every row of `in`, in parallel; row r's loss and weight
// times sample_weight[r] where that is given (the rows' own, already offset).
template <typename scalar_t, bool kEntropy>
void forward_rows(const Rows<scalar_t>& in, const at::Tensor& weight, const at::opmath_type<scalar_t>* sample_weight,
                  const LossOptions& options, const ForwardOut<at::opmath_type<scalar_t>>& out) {
  using T = at::opmath_type<scalar_t>;
  at::Tensor weight_storage;
  std::vector<T> block_sums;
  const auto o = make_options<T>(in.classes, weight, options, weight_storage, block_sums);
  const int64_t n = in.classes;
  const auto store = [&](int64_t r, const RowResult<T>& res) {
    // An ignored row adds 0 to both sums whatever its sample weight (even inf or NaN).
    const bool weighed = sample_weight != nullptr &&
                         !(in.class_target != nullptr && in.class_target[r] == o.ignore_index);
    out.loss[r] = weighed ? res.loss * sample_weight[r] : res.loss;
    out.max[r] = res.max;
    out.log_sum[r] = static_cast<T>(res.log_sum);
    out.target_logit[r] = res.target_logit;
    out.weight[r] = weighed ? static_cast<double>(res.weight) * sample_weight[r] : static_cast<double>(res.weight);
    if constexpr (kEntropy) out.entropy[r] = static_cast<T>(res.entropy);
  };
  at::parallel_for(0, in.rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
    std::vector<T> x_scratch, q_scratch;
    int64_t r = begin;
    if (in.class_target != nullptr && n <= kFewClasses) {
      constexpr int64_t kLanes = Vectorized<T>::size();
      std::array<RowResult<T>, kLanes> res;
      for (; r + kLanes <= end; r += kLanes) {
        // The block of kLanes rows as one "row" of kLanes * classes elements.
        forward_class_rows_few<T, kEntropy>(rows_as_calc(in.x, r, n, kLanes, x_scratch, o), in.class_target + r, o,
                                            res.data());
        for (int64_t lane = 0; lane < kLanes; ++lane) store(r + lane, res[lane]);
      }
    }
    for (; r < end; ++r) {
      const T* z = rows_as_calc(in.x, r, n, 1, x_scratch, o);
      store(r, in.class_target != nullptr
                   ? forward_class_row<T, kEntropy>(z, in.class_target[r], o)
                   : forward_prob_row<T, kEntropy>(z, row_as_acc<scalar_t, T>(in.prob_target, r, n, q_scratch), o));
    }
  });
}

template <typename scalar_t>
void forward(const Rows<scalar_t>& in, const at::Tensor& weight, const at::opmath_type<scalar_t>* sample_weight,
             const LossOptions& options, const ForwardOut<at::opmath_type<scalar_t>>& out) {
  if (options.entropy) {
    forward_rows<scalar_t, true>(in, weight, sample_weight, options, out);
  } else {
    forward_rows<scalar_t, false>(in, weight, sample_weight, options, out);
  }
}

// The op's loss from forward's per-row losses and weights, both summed in double:
// `loss` gets each row's loss (reduction none) or their sum or mean, and
// `total_weight` the summed weights (the mean's divisor).
template <typename scalar_t>
void reduce_rows(const std::vector<double>& losses, const std::vector<double>& weights, int64_t reduction,
                 at::Tensor& loss, at::Tensor& total_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = static_cast<int64_t>(losses.size());
  double loss_sum = 0, weight_sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    loss_sum += losses[r];
    weight_sum += weights[r];
  }
  total_weight.data_ptr<acc_t>()[0] = static_cast<acc_t>(weight_sum);
  scalar_t* loss_p = loss.data_ptr<scalar_t>();
  if (reduction == at::Reduction::None) {
    for (int64_t r = 0; r < rows; ++r) loss_p[r] = static_cast<scalar_t>(losses[r]);
  } else {
    // A mean over no weight is nan, as in PyTorch (whose nll term is 0 / 0
    // even where smoothing adds to the numerator).
    const double value = reduction == at::Reduction::Sum ? loss_sum
                         : weight_sum == 0           ? std::nan("")
                                                     : loss_sum / weight_sum;
    loss_p[0] = static_cast<scalar_t>(value);
  }
}

// Per-row inputs of backward besides its statistics, each (rows,) in the
// accumulation type or null: the sample weights (null: 1) and the extras, the
// upstream gradients of the target's log-probability (null: 0) and of the
// entropy, with forward's entropy (both null, or neither).
template <typename T>
struct RowFactors {
  const T* sample_weight = nullptr;
  const T* grad_logprob = nullptr;
  const T* grad_entropy = nullptr;
  const T* row_entropy = nullptr;

  // Those of rows [begin, ...): a chunk's.
  RowFactors from(int64_t begin) const {
    const auto at = [begin](const T* p) { return p == nullptr ? p : p + begin; };
    return {at(sample_weight), at(grad_logprob), at(grad_entropy), at(row_entropy)};
  }
};

// `t` where given, in `acc_type` and contiguous (the kernels read it as such),
// else undefined.
inline at::Tensor rows_in(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  return t.has_value() ? t->to(acc_type).contiguous() : at::Tensor();
}

// What backward reads besides the logits, in the accumulation type `acc_type`:
// forward's per-row max and log-sum, and each row's factor: its upstream
// gradient with no reduction (`row_scale`), else one scalar (`common_scale`,
// divided by the mean's divisor; nan for a divisor of 0); and the per-row
// sample weights and extras (undefined where not given).
struct BackwardInputs {
  at::Tensor row_max, row_log_sum, row_scale;  // row_scale undefined unless reduction none
  double common_scale = 0;
  at::Tensor sample_weight, grad_logprob, grad_entropy, row_entropy;

  template <typename T>
  RowFactors<T> factors() const {
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    return {ptr(sample_weight), ptr(grad_logprob), ptr(grad_entropy), ptr(row_entropy)};
  }
};

inline BackwardInputs backward_inputs(const at::Tensor& grad_loss, const at::Tensor& row_max,
                                      const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                                      int64_t reduction, at::ScalarType acc_type,
                                      const std::optional<at::Tensor>& sample_weight = std::nullopt,
                                      const std::optional<at::Tensor>& grad_logprob = std::nullopt,
                                      const std::optional<at::Tensor>& grad_entropy = std::nullopt,
                                      const std::optional<at::Tensor>& row_entropy = std::nullopt) {
  BackwardInputs b{row_max.to(acc_type).contiguous(), row_log_sum.to(acc_type).contiguous(), at::Tensor(), 0};
  b.sample_weight = rows_in(sample_weight, acc_type);
  b.grad_logprob = rows_in(grad_logprob, acc_type);
  b.grad_entropy = rows_in(grad_entropy, acc_type);
  b.row_entropy = rows_in(row_entropy, acc_type);
  if (reduction == at::Reduction::None) {
    b.row_scale = grad_loss.to(acc_type).contiguous();
    return b;
  }
  b.common_scale = grad_loss.item<double>();
  if (reduction == at::Reduction::Mean) {
    const double divisor = total_weight.item<double>();
    b.common_scale = divisor == 0 ? std::nan("") : b.common_scale / divisor;
  }
  return b;
}

// Rows that hold a shard of the classes, [class_start, class_start + columns)
// of `classes` (vocabulary parallelism): weight_sum is W, the sum of the weights
// of every class, and row_weight[r] row r's sum(w q) over every class.
template <typename T>
struct Shard {
  int64_t class_start;
  int64_t classes;
  double weight_sum;
  const T* row_weight;
};

// The gradient of every row of `in` into `grad` (which may be `in.x` itself):
// row r's upstream factor is row_scale[r], or common_scale where row_scale is null,
// times its sample weight; `factors` (the rows' own, already offset) also give
// the extras. With `shard`, the gradient of the loss over every class w.r.t. the
// shard's columns; row_max, row_log_sum and row_entropy are then those of the
// whole rows.
template <typename scalar_t, bool kEntropy>
void backward_rows(const Rows<scalar_t>& in, scalar_t* grad, const at::Tensor& weight,
                   const at::opmath_type<scalar_t>* row_max, const at::opmath_type<scalar_t>* row_log_sum,
                   const at::opmath_type<scalar_t>* row_scale, double common_scale, const LossOptions& options,
                   const RowFactors<at::opmath_type<scalar_t>>& factors,
                   const Shard<at::opmath_type<scalar_t>>* shard) {
  using T = at::opmath_type<scalar_t>;
  at::Tensor weight_storage;
  std::vector<T> block_sums;
  auto o = make_options<T>(in.classes, weight, options, weight_storage, block_sums);
  if (shard != nullptr) {
    o.classes = shard->classes;
    o.class_start = shard->class_start;
    o.weight_sum = static_cast<T>(shard->weight_sum);
  }
  const int64_t n = in.classes;
  const T scale_all = static_cast<T>(common_scale);
  const bool tempered = o.inv_temperature != T(1);
  at::parallel_for(0, in.rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
    std::vector<T> x_scratch, z_scratch, q_scratch, g_scratch, slope;
    for (int64_t r = begin; r < end; ++r) {
      // z (capped, a copy: the gradient may then overwrite the logits) and dz/dx
      // together, from one exponential per logit; or z tempered, a copy too.
      const T* z = row_as_acc<scalar_t, T>(in.x, r, n, x_scratch);
      if (o.softcap != T(0)) {
        slope.resize(n);
        z_scratch.resize(n);
        cap(z, z_scratch.data(), slope.data(), n, o.softcap_exact, o.inv_temperature_exact);
        z = z_scratch.data();
      } else if (tempered) {
        z_scratch.resize(n);
        temper(z, z_scratch.data(), n, o.inv_temperature);
        z = z_scratch.data();
      }
      T* grad_row = grad_row_as_acc<scalar_t, T>(grad, r, n, g_scratch);
      // Uncapped, dz/dx is 1 / temperature for every logit: a factor of the row's
      // coefficients, of which the gradient is linear, not one more pass over it.
      const T slope_all = o.softcap == T(0) && tempered ? o.inv_temperature : T(1);
      T scale = (row_scale != nullptr ? row_scale[r] : scale_all) * slope_all;
      if (factors.sample_weight != nullptr) scale *= factors.sample_weight[r];
      RowExtraGrads<T> extra;
      if (factors.grad_logprob != nullptr) extra.logprob = factors.grad_logprob[r] * slope_all;
      if constexpr (kEntropy) {
        extra.entropy = factors.grad_entropy[r] * slope_all;
        extra.entropy_shift = factors.row_entropy[r] - row_log_sum[r];
      }
      const T* row_weight = shard != nullptr ? shard->row_weight + r : nullptr;
      if (in.class_target != nullptr) {
        backward_class_row<T, kEntropy>(z, grad_row, in.class_target[r], row_max[r], row_log_sum[r], scale, o,
                                        row_weight, extra);
      } else {
        backward_prob_row<T, kEntropy>(z, row_as_acc<scalar_t, T>(in.prob_target, r, n, q_scratch), grad_row,
                                       row_max[r], row_log_sum[r], scale, o, row_weight, extra);
      }
      if (o.softcap != T(0)) {
        at::vec::map2<T>([](Vectorized<T> g, Vectorized<T> d) { return g * d; }, grad_row, grad_row, slope.data(),
                         n);
      }
      store_grad_row(grad_row, grad, r, n);
    }
  });
}

template <typename scalar_t>
void backward(const Rows<scalar_t>& in, scalar_t* grad, const at::Tensor& weight,
              const at::opmath_type<scalar_t>* row_max, const at::opmath_type<scalar_t>* row_log_sum,
              const at::opmath_type<scalar_t>* row_scale, double common_scale, const LossOptions& options,
              const RowFactors<at::opmath_type<scalar_t>>& factors = {},
              const Shard<at::opmath_type<scalar_t>>* shard = nullptr) {
  if (factors.grad_entropy != nullptr) {
    backward_rows<scalar_t, true>(in, grad, weight, row_max, row_log_sum, row_scale, common_scale, options, factors,
                                  shard);
  } else {
    backward_rows<scalar_t, false>(in, grad, weight, row_max, row_log_sum, row_scale, common_scale, options, factors,
                                   shard);
  }
}

}  // namespace ce
}  // namespace myext
