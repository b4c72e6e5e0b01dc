// Cross-entropy on CUDA.
//
// Forward reads each row of logits once: every thread keeps an online softmax
// (running max and sum of exponentials, rescaled when the max grows) together
// with the weighted gap sum that label smoothing and probability targets
// need, and the block merges the threads' partial statistics with warp
// shuffles. Forward keeps two numbers per row for backward, the row's max and
// log(sum(exp(x - max))), never their rounded sum, so that backward's softmax
// exp((x - max) - log_sum) is as precise as PyTorch's at any scale.
// A row of up to kMaxChunk classes is one block; a longer row (large
// vocabularies) is split over several blocks whose statistics a second,
// small kernel merges. Backward writes the gradient, into a new buffer or over
// the logits, in one read of them (probability targets also take a first pass
// over the targets for sum(w q), which forward's outputs do not carry). The
// backward of a shard of the classes (vocabulary parallelism) is the same
// kernel given the whole rows' statistics and sum(w q).
// Math is in float32 for bfloat16/float16 inputs (float64 for float64), and
// loads are 128-bit wherever every row starts 16-byte aligned.
//
// The per-row quantities, as in the CPU row kernels (csrc/cpu/cross_entropy_rows.h):
// with q the target distribution after label smoothing and w the class
// weights (ones if none),
//   loss = sum(w q (max - x)) + sum(w q) log_sum,   grad = sum(w q) * softmax(x) - w q,
// where a class-index target t gives q = (1 - eps) onehot(t) + eps / C. Every
// term of the gap sum sum(w q (max - x)) is >= 0: no cancellation for large logits.
// x here is z = cap(x) / temperature, the logit the softmax sees; backward
// multiplies by dz/dx = cap'(x) / temperature. A row's sample weight s scales
// its loss, its share of the mean's divisor and its gradient.
//
// Forward's entropy H = log_sum + B / sum_exp with B = sum(exp(x - max) (max - x)),
// kept online like the gap sum: every term >= 0, and where the max grows from m
// to m', B' = exp(m - m') (B + sum_exp (m' - m)). Backward's extras add, for the
// upstream gradients g_lp of log p_t and g_H of H, g_lp (onehot(t) - p) and
// -g_H p (x - lse + H), the latter from (x - max) + (H - log_sum): no large
// terms that cancel.
//
// Only the ATen headers in use are included, not ATen/ATen.h: nvcc parses
// every header several times (host, and device once per architecture), and
// ATen/ATen.h would add about a third to the build time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "common.cuh"
#include "cross_entropy_kernels.h"

namespace myext {
namespace cuda {
namespace {

// Classes one block reduces. Up to this a block per row keeps every SM busy
// for any batch worth launching; longer rows are split so that a batch of a
// few rows of a 128k vocabulary still spreads over several SMs.
constexpr int64_t kMaxChunk = 65536;
constexpr int kMaxThreads = 256;
constexpr int kCombineThreads = 256;

template <typename scalar_t, typename acc_t>
struct Problem {
  const scalar_t* input;        // (R, C) logits
  const int64_t* class_target;  // (R,) class indices, or null
  const scalar_t* prob_target;  // (R, C) probabilities, or null
  const acc_t* weight;          // (C,) class weights, or null: all ones
  const acc_t* weight_sum;      // device scalar sum of every class's weight, or null: C
  int64_t classes;
  int64_t chunk;                // block (row, j) covers classes [j chunk, (j + 1) chunk)
  int64_t ignore_index;
  acc_t smoothing;
  acc_t z_loss;   // lambda of lambda lse^2; 0: none
  acc_t softcap;  // logits capped at softcap tanh(x / softcap); 0: none
  acc_t temperature;           // z = cap(x) / temperature; 1: none
  const acc_t* sample_weight;  // (R,) each row's weight, or null: all ones
};

// dz/dx at a logit x: 1 / cosh^2(x / softcap) = 4 e / (1 + e)^2 with e =
// exp(-2 |x| / softcap), 1 where not capped (1 - tanh^2 would cancel to nothing
// where tanh is within rounding of 1), over the temperature. Both tests are
// uniform over the launch: a temperature of 1 divides by nothing.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t cap_slope(const Problem<scalar_t, acc_t>& p, acc_t x) {
  acc_t slope = acc_t(1);
  if (p.softcap != acc_t(0)) {
    const acc_t e = std::exp(acc_t(-2) * std::abs(x) / p.softcap);
    slope = acc_t(4) * e / ((acc_t(1) + e) * (acc_t(1) + e));
  }
  return p.temperature == acc_t(1) ? slope : slope / p.temperature;
}

// The logit the softmax sees: capped where asked, over the temperature.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t capped(const Problem<scalar_t, acc_t>& p, acc_t x) {
  const acc_t z = p.softcap == acc_t(0) ? x : p.softcap * std::tanh(x / p.softcap);
  return p.temperature == acc_t(1) ? z : z / p.temperature;
}

// A row's sample weight s.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sample_weight(const Problem<scalar_t, acc_t>& p, int64_t row) {
  return p.sample_weight == nullptr ? acc_t(1) : p.sample_weight[row];
}

template <typename acc_t>
struct RowOutputs {
  acc_t* loss;
  acc_t* max;
  acc_t* log_sum;
  acc_t* target_logit;  // the target's z (capped, over the temperature), for the token accuracy
  acc_t* row_weight;    // the row's share of the mean's divisor
  acc_t* entropy;       // the entropy of the row's softmax, or null: not asked
};

// Partial statistics of a row (or of a chunk of one). With weights v (w for
// label smoothing of class targets, w q for probability targets): their sum
// over the elements seen, and the gap sum(v (max - x)).
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum_exp;  // sum(exp(x - max))
  acc_t weight;
  acc_t gap;
};

// RowStats and the entropy's B = sum(exp(x - max) (max - x)): a type of its
// own, so that forward without the entropy keeps its four-number reductions.
template <typename acc_t>
struct EntropyRowStats : RowStats<acc_t> {
  acc_t ent;
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& s, int mask) {
  using myext::cuda::shfl_xor;  // the scalar overload, hidden by this one
  return {shfl_xor(s.max, mask), shfl_xor(s.sum_exp, mask), shfl_xor(s.weight, mask),
          shfl_xor(s.gap, mask)};
}

template <typename acc_t>
__device__ __forceinline__ EntropyRowStats<acc_t> shfl_xor(const EntropyRowStats<acc_t>& s, int mask) {
  using myext::cuda::shfl_xor;
  EntropyRowStats<acc_t> out;
  static_cast<RowStats<acc_t>&>(out) = shfl_xor(static_cast<const RowStats<acc_t>&>(s), mask);
  out.ent = shfl_xor(s.ent, mask);
  return out;
}

// max(a, b) that is NaN when either is.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || isnan(a)) ? a : b;
}

// Rescales `sum_exp` from `max` to `new_max` (>= max). Comparing first keeps an
// all -inf part at 0 instead of exp(-inf - -inf) = NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t sum_exp, acc_t max, acc_t new_max) {
  return max == new_max ? sum_exp : sum_exp * std::exp(max - new_max);
}

// The gap of `s` moved up to `new_max`: every element seen sits that much
// further below it (from a max of -inf, infinitely).
template <typename acc_t>
__device__ __forceinline__ acc_t regap(const RowStats<acc_t>& s, acc_t new_max) {
  return (s.weight == acc_t(0) || s.max == new_max) ? s.gap : s.gap + s.weight * (new_max - s.max);
}

// The entropy's B of `s` moved up to `new_max` (>= s.max), from s's own
// sum_exp: B' = exp(m - m') (B + sum_exp (m' - m)). A part whose max is -inf
// has seen only classes of probability 0, which add 0 (not 0 * inf).
template <typename acc_t>
__device__ __forceinline__ acc_t regrow_entropy(acc_t ent, acc_t sum_exp, acc_t max, acc_t new_max) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (max == new_max || max == -kInf) return ent;
  return (ent + sum_exp * (new_max - max)) * std::exp(max - new_max);
}

struct MergeStats {
  template <typename acc_t>
  __device__ RowStats<acc_t> operator()(const RowStats<acc_t>& a, const RowStats<acc_t>& b) const {
    const acc_t max = nan_max(a.max, b.max);
    return {max, rescale(a.sum_exp, a.max, max) + rescale(b.sum_exp, b.max, max),
            a.weight + b.weight, regap(a, max) + regap(b, max)};
  }

  template <typename acc_t>
  __device__ EntropyRowStats<acc_t> operator()(const EntropyRowStats<acc_t>& a,
                                               const EntropyRowStats<acc_t>& b) const {
    EntropyRowStats<acc_t> out;
    static_cast<RowStats<acc_t>&>(out) =
        (*this)(static_cast<const RowStats<acc_t>&>(a), static_cast<const RowStats<acc_t>&>(b));
    out.ent = regrow_entropy(a.ent, a.sum_exp, a.max, out.max) + regrow_entropy(b.ent, b.sum_exp, b.max, out.max);
    return out;
  }
};

// The statistics forward keeps: with the entropy's B where it is asked.
template <typename acc_t, bool kEntropy>
using StatsFor = std::conditional_t<kEntropy, EntropyRowStats<acc_t>, RowStats<acc_t>>;

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t nan_value() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t total_class_weight(const Problem<scalar_t, acc_t>& p) {
  return p.weight_sum == nullptr ? static_cast<acc_t>(p.classes) : *p.weight_sum;
}

// The weights of classes [c, c + VEC).
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ Pack<acc_t, VEC> load_weights(const Problem<scalar_t, acc_t>& p, int64_t c) {
  if (p.weight != nullptr) return load_pack<VEC>(p.weight + c);
  Pack<acc_t, VEC> ones;
#pragma unroll
  for (int i = 0; i < VEC; ++i) ones.val[i] = acc_t(1);
  return ones;
}

// The class index of a row that is not ignored. An index outside [0,
// classes) stops the kernel with a device-side assertion; where assertions are
// compiled out it yields -1, which callers turn into NaN without reading
// memory with it.
__device__ __forceinline__ int64_t checked_target(int64_t t, int64_t classes) {
  const bool in_range = t >= 0 && t < classes;
  CUDA_KERNEL_ASSERT(in_range && "cross_entropy: target class index out of range");
  return in_range ? t : -1;
}

template <typename acc_t>
__device__ __forceinline__ void write_ignored_row(const RowOutputs<acc_t>& out, int64_t row) {
  // The max and log_sum of an ignored row are never read: they are not computed.
  out.loss[row] = acc_t(0);
  out.max[row] = acc_t(0);
  out.log_sum[row] = acc_t(0);
  out.target_logit[row] = acc_t(0);
  out.row_weight[row] = acc_t(0);
  if (out.entropy != nullptr) out.entropy[row] = acc_t(0);
}

// Turns a row's statistics into its loss, max, log_sum, weight in the mean and,
// with EntropyRowStats, entropy. The loss keeps max and log(sum_exp) apart,
// (max - x_t) + log_sum and the gap sum, which stay exact for logits of large
// magnitude where lse - x would cancel.
template <bool kProb, typename scalar_t, typename acc_t, typename Stats>
__device__ void finish_row(const Problem<scalar_t, acc_t>& p, int64_t row,
                           const Stats& s, const RowOutputs<acc_t>& out) {
  const acc_t log_sum = std::log(s.sum_exp);
  acc_t loss;
  acc_t row_weight = acc_t(1);
  acc_t z_t = acc_t(0);
  if constexpr (kProb) {
    // s.weight is sum(w q) here.
    loss = s.gap + s.weight * log_sum;
  } else {
    const int64_t t = checked_target(p.class_target[row], p.classes);
    row_weight = t < 0 ? nan_value<acc_t>() : (p.weight == nullptr ? acc_t(1) : p.weight[t]);
    z_t = t < 0 ? nan_value<acc_t>() : capped(p, static_cast<acc_t>(p.input[row * p.classes + t]));
    loss = (acc_t(1) - p.smoothing) * row_weight * ((s.max - z_t) + log_sum);
    if (p.smoothing > acc_t(0)) {
      // eps / C sum_c w_c (lse - x_c); s.weight is sum(w) here.
      loss += p.smoothing / static_cast<acc_t>(p.classes) * (s.gap + s.weight * log_sum);
    }
  }
  if (p.z_loss != acc_t(0)) {
    const acc_t lse = s.max + log_sum;
    loss += p.z_loss * lse * lse;
  }
  // Every term of the row's loss, and its share of the divisor, scale with it.
  if (p.sample_weight != nullptr) {
    const acc_t sw = p.sample_weight[row];
    loss *= sw;
    row_weight *= sw;
  }
  out.loss[row] = loss;
  out.max[row] = s.max;
  out.log_sum[row] = log_sum;
  out.target_logit[row] = z_t;
  out.row_weight[row] = row_weight;
  if constexpr (std::is_same_v<Stats, EntropyRowStats<acc_t>>) {
    out.entropy[row] = log_sum + s.ent / s.sum_exp;
  }
}

// Block (row, j) reduces chunk j of the row. With one chunk per row it writes
// the row's results; otherwise its statistics go to partial[row][j] for
// combine_kernel.
template <typename scalar_t, typename acc_t, int VEC, bool kProb, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const Problem<scalar_t, acc_t> p, StatsFor<acc_t, kEntropy>* partial,
                   const RowOutputs<acc_t> out) {
  const int64_t row = blockIdx.x;
  const bool split = gridDim.y > 1;
  if constexpr (!kProb) {
    if (p.class_target[row] == p.ignore_index) {
      if (!split && threadIdx.x == 0) write_ignored_row(out, row);
      return;  // combine_kernel handles split ignored rows itself.
    }
  }
  const int64_t begin = blockIdx.y * p.chunk;
  const int64_t end = std::min(begin + p.chunk, p.classes);
  const scalar_t* x = p.input + row * p.classes;
  const scalar_t* q = kProb ? p.prob_target + row * p.classes : nullptr;
  const bool need_v = kProb || p.smoothing > acc_t(0);
  const acc_t keep = acc_t(1) - p.smoothing;
  const acc_t eps_c = p.smoothing / static_cast<acc_t>(p.classes);
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

  StatsFor<acc_t, kEntropy> s;
  s.max = -kInf;
  s.sum_exp = 0;
  s.weight = 0;
  s.gap = 0;
  if constexpr (kEntropy) s.ent = 0;
  for (int64_t c = begin + threadIdx.x * VEC; c < end; c += blockDim.x * VEC) {
    const auto packed_x = load_pack<VEC>(x + c);
    acc_t xs[VEC];
    acc_t pack_max = -kInf;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xs[i] = capped(p, static_cast<acc_t>(packed_x.val[i]));
      pack_max = nan_max(xs[i], pack_max);
    }
    if (!(pack_max <= s.max)) {  // the max grows, or is NaN
      // (B moves with the sum_exp of the old max: first.)
      if constexpr (kEntropy) s.ent = regrow_entropy(s.ent, s.sum_exp, s.max, pack_max);
      s.sum_exp = rescale(s.sum_exp, s.max, pack_max);
      s.gap = regap(s, pack_max);
      s.max = pack_max;
    }
    // While every logit so far is -inf, exp(x - 0) adds the zeros it should.
    const acc_t shift = s.max == -kInf ? acc_t(0) : s.max;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t e = std::exp(xs[i] - shift);
      s.sum_exp += e;
      // A class of probability 0 (x = -inf, also while the max is -inf) adds 0, not 0 * inf.
      if constexpr (kEntropy) s.ent += xs[i] == -kInf ? acc_t(0) : e * (s.max - xs[i]);
    }

    if (need_v) {
      const auto w = load_weights<VEC>(p, c);
      Pack<scalar_t, VEC> packed_q;
      if constexpr (kProb) packed_q = load_pack<VEC>(q + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t v = kProb ? w.val[i] * (keep * static_cast<acc_t>(packed_q.val[i]) + eps_c) : w.val[i];
        // A -inf logit is +inf below any max, also below a max of -inf.
        s.gap += v * (xs[i] == -kInf ? kInf : s.max - xs[i]);
        s.weight += v;
      }
    }
  }

  s = block_reduce(s, MergeStats{});
  if (threadIdx.x != 0) return;
  if (split) {
    partial[row * gridDim.y + blockIdx.y] = s;
  } else {
    finish_row<kProb>(p, row, s, out);
  }
}

// One thread per row: merges the row's `splits` partial statistics.
template <typename scalar_t, typename acc_t, bool kProb, bool kEntropy>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const Problem<scalar_t, acc_t> p, const StatsFor<acc_t, kEntropy>* partial,
                   int64_t rows, int64_t splits, const RowOutputs<acc_t> out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  if constexpr (!kProb) {
    if (p.class_target[row] == p.ignore_index) {
      write_ignored_row(out, row);
      return;
    }
  }
  StatsFor<acc_t, kEntropy> s = partial[row * splits];
  for (int64_t j = 1; j < splits; ++j) s = MergeStats{}(s, partial[row * splits + j]);
  finish_row<kProb>(p, row, s, out);
}

// sum(w q) of each row of probability targets: the one row quantity that
// backward needs and forward's outputs do not carry.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    target_weight_sum_kernel(const Problem<scalar_t, acc_t> p, acc_t* sums) {
  const int64_t row = blockIdx.x;
  const scalar_t* q = p.prob_target + row * p.classes;
  acc_t sum = 0;
  for (int64_t c = threadIdx.x * VEC; c < p.classes; c += blockDim.x * VEC) {
    const auto packed_q = load_pack<VEC>(q + c);
    const auto w = load_weights<VEC>(p, c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += w.val[i] * static_cast<acc_t>(packed_q.val[i]);
  }
  sum = block_reduce(sum, Sum{});
  if (threadIdx.x == 0) sums[row] = sum;
}

// Rows that hold a shard of the classes, [class_start, class_start + p.classes)
// of `classes` (vocabulary parallelism): backward is then given the whole rows'
// max and log_sum, and Problem::weight_sum is every class's.
template <typename acc_t>
struct Shard {
  int64_t class_start;
  int64_t classes;
  const acc_t* row_weight;  // (R,) each row's sum(w q) over every class
};

// The entropy's term of the gradient of a class, -g_H p (x - lse + H) given
// ent_coef = -g_H, ent_shift = H - log_sum and shifted = x - max. A class of
// probability 0 adds 0: its x - lse is -inf (or lower than any float).
template <typename acc_t>
__device__ __forceinline__ acc_t entropy_term(acc_t ent_coef, acc_t ent_shift, acc_t softmax, acc_t shifted) {
  return softmax == acc_t(0) ? acc_t(0) : ent_coef * softmax * (shifted + ent_shift);
}

// The upstream gradients of each row's log p_t and entropy, and forward's
// entropy, (R,) in the accumulation type; each null where not given.
template <typename acc_t>
struct Extras {
  const acc_t* grad_logprob;
  const acc_t* grad_entropy;
  const acc_t* row_entropy;  // given with grad_entropy
};

// grad = scale * (sum(w q) softmax(x) - w q) for chunk blockIdx.y of a row,
// with scale the row's upstream gradient (over the mean's divisor) times its
// sample weight, plus the extras' terms. With kShard, of the loss over every
// class w.r.t. the shard's: sum(w q) is the shard's row_weight (a shard
// without the target cannot compute it) instead of target_weight_sum's, and a
// target in another shard adds no term here (nor g_lp's delta). kEntropyGrad:
// the entropy's term, the one extra that costs work per class.
template <typename scalar_t, typename acc_t, int VEC, bool kProb, bool kShard, bool kEntropyGrad>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const Problem<scalar_t, acc_t> p, const acc_t* row_max,
                    const acc_t* row_log_sum, const acc_t* scale, int64_t scale_stride,
                    const acc_t* target_weight_sum, const Shard<acc_t> shard, const Extras<acc_t> extras,
                    scalar_t* grad) {
  const int64_t row = blockIdx.x;
  const int64_t begin = blockIdx.y * p.chunk;
  const int64_t end = std::min(begin + p.chunk, p.classes);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  const scalar_t* x = p.input + row * p.classes;
  scalar_t* g = grad + row * p.classes;

  // The extras' terms are not the loss's: the sample weight is in s alone.
  const acc_t s = scale[row * scale_stride] * sample_weight(p, row);
  const acc_t keep = acc_t(1) - p.smoothing;
  const acc_t eps_c = p.smoothing / static_cast<acc_t>(kShard ? shard.classes : p.classes);
  // s 2 lambda lse: the z-loss's coefficient of the softmax.
  const acc_t z_coef = p.z_loss == acc_t(0) ? acc_t(0) : s * acc_t(2) * p.z_loss * (row_max[row] + row_log_sum[row]);
  acc_t softmax_coef;           // s * (sum(w q) + 2 lambda lse)
  acc_t smooth_coef = 0;        // s * eps / C: class-index targets' uniform part
  acc_t target_coef = 0;        // s * (1 - eps) * w_t, taken off at the target class
  int64_t t = -1;
  if constexpr (kProb) {
    // The z-loss's term is added apart (below): folded in, it would carry the rounding
    // of 1 + 2 lambda lse where the rest cancels to nearly 0.
    softmax_coef = kShard ? s * shard.row_weight[row]
                          : s * (keep * target_weight_sum[row] + eps_c * total_class_weight(p));
  } else {
    const int64_t raw = p.class_target[row];
    if (raw == p.ignore_index) {
      const Pack<scalar_t, VEC> zeros{};  // all bits zero: +0 in every float type
      for (int64_t c = begin + threadIdx.x * VEC; c < end; c += stride) store_pack(g + c, zeros);
      return;
    }
    const int64_t class_index = checked_target(raw, kShard ? shard.classes : p.classes);
    t = class_index;
    if constexpr (kShard) {
      // The target's column here, or -1 where another shard holds it (an index
      // out of range, -1, lands before the shard too).
      const int64_t local = class_index - shard.class_start;
      t = local >= 0 && local < p.classes ? local : -1;
    }
    const acc_t w_t = t < 0 ? nan_value<acc_t>() : (p.weight == nullptr ? acc_t(1) : p.weight[t]);
    if constexpr (kShard) {
      softmax_coef = class_index < 0 ? nan_value<acc_t>() : s * shard.row_weight[row] + z_coef;
    } else {
      // Without smoothing the other class weights take no part (a NaN among them
      // must not reach the gradient).
      softmax_coef = s * (keep * w_t + (p.smoothing > acc_t(0) ? eps_c * total_class_weight(p) : acc_t(0))) + z_coef;
    }
    smooth_coef = s * eps_c;
    target_coef = s * keep * w_t;
    // g_lp (onehot(t) - p): -g_lp on every class's softmax, and at the target
    // (c - g_lp) (p_t - 1) keeps expm1's grouping.
    if (extras.grad_logprob != nullptr) {
      const acc_t g_lp = extras.grad_logprob[row];
      softmax_coef -= g_lp;
      target_coef -= g_lp;
    }
  }
  // softmax = exp((x - max) - log_sum), the two kept apart: precise at any scale.
  const acc_t max = row_max[row];
  const acc_t log_sum = row_log_sum[row];
  const bool need_w = kProb || p.smoothing > acc_t(0);
  // -g_H p (x - lse + H) = ent_coef p ((x - max) + ent_shift).
  acc_t ent_coef = 0;
  acc_t ent_shift = 0;
  if constexpr (kEntropyGrad) {
    ent_coef = -extras.grad_entropy[row];
    ent_shift = extras.row_entropy[row] - log_sum;
  }

  for (int64_t c = begin + threadIdx.x * VEC; c < end; c += stride) {
    const auto packed_x = load_pack<VEC>(x + c);
    const auto w = need_w ? load_weights<VEC>(p, c) : Pack<acc_t, VEC>{};
    Pack<scalar_t, VEC> out;
    if constexpr (kProb) {
      const auto packed_q = load_pack<VEC>(p.prob_target + row * p.classes + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t wq = (keep * static_cast<acc_t>(packed_q.val[i]) + eps_c) * w.val[i];
        const acc_t x_i = static_cast<acc_t>(packed_x.val[i]);
        const acc_t shifted = capped(p, x_i) - max;
        const acc_t softmax = std::exp(shifted - log_sum);
        acc_t value = (softmax_coef * softmax - s * wq) + z_coef * softmax;
        if constexpr (kEntropyGrad) value += entropy_term(ent_coef, ent_shift, softmax, shifted);
        out.val[i] = static_cast<scalar_t>(value * cap_slope(p, x_i));
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t x_i = static_cast<acc_t>(packed_x.val[i]);
        const acc_t shifted = capped(p, x_i) - max;
        const acc_t log_softmax = shifted - log_sum;
        const acc_t softmax = std::exp(log_softmax);
        acc_t value = softmax_coef * softmax;
        if (need_w) value -= smooth_coef * w.val[i];
        if (c + i == t) {
          // target_coef (p - 1) + smooth_coef (W p - w_t) + z_coef p: the terms grouped
          // so that they cancel where they should (p - 1 as expm1, exact for p near 1).
          value = target_coef * std::expm1(log_softmax) + z_coef * softmax +
                  (need_w ? smooth_coef * (total_class_weight(p) * softmax - w.val[i]) : acc_t(0));
        }
        if constexpr (kEntropyGrad) value += entropy_term(ent_coef, ent_shift, softmax, shifted);
        out.val[i] = static_cast<scalar_t>(value * cap_slope(p, x_i));
      }
    }
    store_pack(g + c, out);
  }
}

// How the classes of a row are cut over blocks.
struct Plan {
  int64_t splits;
  int64_t chunk;
  int threads;
};

int threads_for(int64_t elements, int vec) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && int64_t{threads} * vec < elements) threads *= 2;
  return threads;
}

Plan make_plan(int64_t classes, int vec) {
  const int64_t splits = std::max<int64_t>(1, ceil_div(classes, kMaxChunk));
  // Whole packs per chunk keep every chunk's start 16-byte aligned.
  const int64_t chunk = ceil_div(ceil_div(classes, splits), vec) * vec;
  return {splits, chunk, threads_for(chunk, vec)};
}

template <typename scalar_t, typename F>
void with_pack_width(bool packed, const F& f) {
  if (packed) {
    f(std::integral_constant<int, kPack16<scalar_t>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f with `flag` as a compile-time constant: a kernel for each value.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The op's tensors in the layout the kernels read.
struct Inputs {
  at::Tensor x;           // (R, C) contiguous
  at::Tensor target;      // (R,) int64 or (R, C) contiguous
  at::Tensor weight;      // (C,) in the accumulation type, or undefined
  at::Tensor weight_sum;  // 0-d sum of every class's weight, or undefined: C
  at::Tensor sample_weight;  // (R,) in the accumulation type, or undefined: ones
  bool probabilities;
};

// `t` (R,) of any floating dtype in the accumulation type, contiguous, or
// undefined where absent: converted on the device, never read on the host.
at::Tensor rows_as(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  return t.has_value() ? t->to(acc_type).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// Lays out checked arguments (csrc/cross_entropy.h) for the kernels. Class
// indices are checked by the kernels as they read them: on the host that
// would synchronise. The weights of a shard of the classes are not all of
// them: the shard's weight_sum is given.
Inputs prepare(const char* op, const at::Tensor& input, const at::Tensor& target,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sample_weight,
               const ClassShard* shard = nullptr) {
  TORCH_CHECK(input.size(0) <= std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 rows, got ", input.size(0));
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Inputs in{input.contiguous(), target.contiguous(), at::Tensor(), at::Tensor(),
            rows_as(sample_weight, acc_type), target.is_floating_point()};
  if (weight.has_value()) in.weight = weight->to(acc_type).contiguous();
  // Stays on the device: reading it on the host would synchronise.
  if (shard != nullptr) {
    in.weight_sum = shard->weight_sum.to(acc_type);
  } else if (weight.has_value()) {
    in.weight_sum = in.weight.sum();
  }
  return in;
}

// The mean's divisor, nan where it is 0 (a mean over no weight is nan, as in
// PyTorch): on the device, with no host synchronisation.
at::Tensor mean_divisor(const at::Tensor& total_weight) {
  return at::where(total_weight.eq(0), at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                total_weight.options()),
                   total_weight);
}

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const Inputs& in, const LossOptions& o) {
  Problem<scalar_t, acc_t> p;
  p.input = in.x.data_ptr<scalar_t>();
  p.class_target = in.probabilities ? nullptr : in.target.data_ptr<int64_t>();
  p.prob_target = in.probabilities ? in.target.data_ptr<scalar_t>() : nullptr;
  p.weight = in.weight.defined() ? in.weight.data_ptr<acc_t>() : nullptr;
  p.weight_sum = in.weight_sum.defined() ? in.weight_sum.data_ptr<acc_t>() : nullptr;
  p.classes = in.x.size(1);
  p.chunk = p.classes;
  p.ignore_index = o.ignore_index;
  p.smoothing = static_cast<acc_t>(o.label_smoothing);
  p.z_loss = static_cast<acc_t>(o.lse_square_scale);
  p.softcap = static_cast<acc_t>(o.softcap);
  p.temperature = static_cast<acc_t>(o.temperature);
  p.sample_weight = ptr_or_null<acc_t>(in.sample_weight);
  return p;
}

// Whether every row of every (R, C) operand, and the weights, start on a
// 16-byte boundary, so that whole packs can be loaded.
template <typename scalar_t, typename acc_t>
bool rows_aligned(const Problem<scalar_t, acc_t>& p, const void* grad) {
  constexpr int vec = kPack16<scalar_t>;
  return p.classes % vec == 0 && is_aligned(p.input, 16) &&
         (p.prob_target == nullptr || is_aligned(p.prob_target, 16)) &&
         (p.weight == nullptr || is_aligned(p.weight, vec * sizeof(acc_t))) &&
         (grad == nullptr || is_aligned(grad, 16));
}

// Writes the gradient into `grad`, which may be the logits themselves: each
// thread reads a pack of logits before it writes the same pack. With `shard`,
// the gradient of the loss over every class w.r.t. the shard's.
void backward_into(at::Tensor& grad, const Inputs& in, const at::Tensor& grad_loss,
                   const at::Tensor& row_max, const at::Tensor& row_log_sum,
                   const at::Tensor& total_weight, const RowExtras& extras, const LossOptions& o,
                   const ClassShard* shard) {
  const int64_t rows = in.x.size(0);
  const auto acc_type = at::toOpMathType(in.x.scalar_type());
  const at::Tensor grad_logprob = rows_as(extras.grad_logprob, acc_type);
  const at::Tensor grad_entropy = rows_as(extras.grad_entropy, acc_type);
  const at::Tensor row_entropy = rows_as(extras.row_entropy, acc_type);
  const at::Tensor max_c = row_max.to(acc_type).contiguous();
  const at::Tensor log_sum_c = row_log_sum.to(acc_type).contiguous();
  // The upstream gradient's factor for each row: one per row for "none",
  // else one for all (stride 0).
  at::Tensor scale = grad_loss.to(acc_type);
  if (o.reduction == at::Reduction::Mean) scale = scale.div(mean_divisor(total_weight.to(acc_type)));
  scale = scale.contiguous();
  const int64_t scale_stride = o.reduction == at::Reduction::None ? 1 : 0;
  const at::Tensor row_weight = shard != nullptr ? shard->row_weight.to(acc_type).contiguous() : at::Tensor();
  if (grad.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, in.x.scalar_type(), "cross_entropy_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          auto p = make_problem<scalar_t, acc_t>(in, o);
          const bool packed = rows_aligned(p, grad.data_ptr());
          const Plan plan = make_plan(p.classes, packed ? kPack16<scalar_t> : 1);
          p.chunk = plan.chunk;
          const auto stream = at::cuda::getCurrentCUDAStream();
          // A shard's row_weight is its rows' sum(w q): no pass over the targets.
          at::Tensor target_weight_sum;
          if (in.probabilities && shard == nullptr) {
            target_weight_sum = at::empty({rows}, in.x.options().dtype(acc_type));
            with_pack_width<scalar_t>(packed, [&](auto width) {
              constexpr int vec = decltype(width)::value;
              target_weight_sum_kernel<scalar_t, acc_t, vec>
                  <<<static_cast<unsigned>(rows), threads_for(p.classes, vec), 0, stream>>>(
                      p, target_weight_sum.data_ptr<acc_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          }
          const Shard<acc_t> shard_args =
              shard == nullptr ? Shard<acc_t>{}
                               : Shard<acc_t>{shard->class_start, shard->classes, row_weight.data_ptr<acc_t>()};
          const Extras<acc_t> extras_args{ptr_or_null<acc_t>(grad_logprob), ptr_or_null<acc_t>(grad_entropy),
                                          ptr_or_null<acc_t>(row_entropy)};
          const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(plan.splits));
          with_flag(in.probabilities, [&](auto probabilities) {
            with_flag(shard != nullptr, [&](auto sharded) {
              with_flag(grad_entropy.defined(), [&](auto entropy_grad) {
                with_pack_width<scalar_t>(packed, [&](auto width) {
                  backward_kernel<scalar_t, acc_t, decltype(width)::value, decltype(probabilities)::value,
                                  decltype(sharded)::value, decltype(entropy_grad)::value>
                      <<<grid, plan.threads, 0, stream>>>(
                          p, max_c.data_ptr<acc_t>(), log_sum_c.data_ptr<acc_t>(),
                          scale.data_ptr<acc_t>(), scale_stride,
                          target_weight_sum.defined() ? target_weight_sum.data_ptr<acc_t>() : nullptr,
                          shard_args, extras_args, grad.data_ptr<scalar_t>());
                  C10_CUDA_KERNEL_LAUNCH_CHECK();
                });
              });
            });
          });
        });
  }
}

}  // namespace

CrossEntropyForward CrossEntropyKernels::forward(const char* op, const at::Tensor& input, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& sample_weight, const LossOptions& o) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Inputs in = prepare(op, input, target, weight, sample_weight);
  const int64_t rows = in.x.size(0);
  const auto acc_options = in.x.options().dtype(at::toOpMathType(in.x.scalar_type()));
  at::Tensor losses = at::empty({rows}, acc_options);
  at::Tensor row_max = at::empty({rows}, acc_options);
  at::Tensor row_log_sum = at::empty({rows}, acc_options);
  at::Tensor target_logit = at::empty({rows}, acc_options);
  at::Tensor row_weights = at::empty({rows}, acc_options);
  // Empty where not asked: the kernels then keep no B at all.
  at::Tensor row_entropy = at::empty({o.entropy ? rows : 0}, acc_options);

  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, in.x.scalar_type(), "cross_entropy_forward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          auto p = make_problem<scalar_t, acc_t>(in, o);
          const bool packed = rows_aligned(p, nullptr);
          const Plan plan = make_plan(p.classes, packed ? kPack16<scalar_t> : 1);
          p.chunk = plan.chunk;
          const RowOutputs<acc_t> out{losses.data_ptr<acc_t>(), row_max.data_ptr<acc_t>(),
                                      row_log_sum.data_ptr<acc_t>(), target_logit.data_ptr<acc_t>(),
                                      row_weights.data_ptr<acc_t>(),
                                      o.entropy ? row_entropy.data_ptr<acc_t>() : nullptr};
          const auto stream = at::cuda::getCurrentCUDAStream();
          const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(plan.splits));
          with_flag(o.entropy, [&](auto entropy) {
            constexpr bool kEntropy = decltype(entropy)::value;
            using Stats = StatsFor<acc_t, kEntropy>;
            at::Tensor partial;
            Stats* partial_ptr = nullptr;
            if (plan.splits > 1) {
              partial = at::empty({rows * plan.splits * static_cast<int64_t>(sizeof(Stats))},
                                  in.x.options().dtype(at::kByte));
              partial_ptr = reinterpret_cast<Stats*>(partial.data_ptr());
            }
            with_flag(in.probabilities, [&](auto probabilities) {
              with_pack_width<scalar_t>(packed, [&](auto width) {
                forward_kernel<scalar_t, acc_t, decltype(width)::value, decltype(probabilities)::value, kEntropy>
                    <<<grid, plan.threads, 0, stream>>>(p, partial_ptr, out);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
              if (plan.splits > 1) {
                combine_kernel<scalar_t, acc_t, decltype(probabilities)::value, kEntropy>
                    <<<static_cast<unsigned>(ceil_div(rows, kCombineThreads)), kCombineThreads, 0,
                       stream>>>(p, partial_ptr, rows, plan.splits, out);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              }
            });
          });
        });
  }

  // Reduced on the device with ATen ops: no host synchronisation.
  const at::Tensor total_weight = row_weights.sum();
  at::Tensor loss;
  if (o.reduction == at::Reduction::None) {
    loss = losses.to(in.x.scalar_type());
  } else if (o.reduction == at::Reduction::Sum) {
    loss = losses.sum().to(in.x.scalar_type());
  } else {
    loss = losses.sum().div(mean_divisor(total_weight)).to(in.x.scalar_type());
  }
  return {loss, row_max, row_log_sum, target_logit, total_weight, row_entropy};
}

at::Tensor CrossEntropyKernels::backward(const char* op, const at::Tensor& grad_loss, const at::Tensor& input,
                                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& sample_weight, const at::Tensor& row_max,
                                         const at::Tensor& row_log_sum, const at::Tensor& total_weight,
                                         const RowExtras& extras, const LossOptions& o, const ClassShard* shard) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Inputs in = prepare(op, input, target, weight, sample_weight, shard);
  at::Tensor grad = at::empty(in.x.sizes(), in.x.options());
  backward_into(grad, in, grad_loss, row_max, row_log_sum, total_weight, extras, o, shard);
  return grad;
}

void CrossEntropyKernels::backward_inplace(const char* op, const at::Tensor& grad_loss, at::Tensor& input,
                                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& sample_weight,
                                           const at::Tensor& row_max, const at::Tensor& row_log_sum,
                                           const at::Tensor& total_weight, const RowExtras& extras,
                                           const LossOptions& o, const ClassShard* shard) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Inputs in = prepare(op, input, target, weight, sample_weight, shard);
  backward_into(input, in, grad_loss, row_max, row_log_sum, total_weight, extras, o, shard);
}

TORCH_LIBRARY_IMPL(myext, CUDA, m) { register_cross_entropy_ops<CrossEntropyKernels>(m); }

}  // namespace cuda
}  // namespace myext
