// The GEMM library choice of gemm.h: a short probe per shape class, cached for the
// process.
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace myext {
namespace cpu {
namespace {

// oneDNN is taken only when it is this much faster: on a tie, at::mm, which reads a
// transposed operand in place where oneDNN's linear first copies it.
constexpr double kOneDnnMargin = 0.95;
// Each library first runs kWarmUpRuns untimed calls: ATen's reduced-dtype GEMM takes
// two to reach its speed at a new shape (oneDNN's, one), and a probe that timed its
// second chose oneDNN where the two tie or ATen wins. Then each runs at least kMinRuns
// timed calls, more while they take under kProbeSeconds in all (small GEMMs time
// noisily), at most kMaxRuns. A new shape class costs its first call
// 2 * (kWarmUpRuns + runs) GEMMs, eight at least, each of at most kProbeWork
// multiply-adds (below): about a tenth of a second per shape class.
constexpr int kWarmUpRuns = 2;
constexpr int kMinRuns = 2;
constexpr int kMaxRuns = 50;
constexpr double kProbeSeconds = 2e-3;
// A probe times the shape's own GEMM up to kProbeWork multiply-adds. A larger one is
// timed on a slice of its largest dimensions (probe_operands), the layouts kept: at a
// language model's head of a large vocabulary (256 x 4096 x 128000 in float32, over a
// second a GEMM on the AMD EPYC family 25 model 17) the probe's eight GEMMs of each of
// the step's three shape classes took the first call 25 s.
constexpr double kProbeWork = 1 << 30;
// Beyond this many shape classes, new ones go to ATen unmeasured: a bound on memory
// and on probing time for a process that sees endless shapes.
constexpr size_t kMaxChoices = 4096;

using Key = std::tuple<at::ScalarType, int64_t, int64_t, int64_t, char, char>;

struct State {
  std::mutex mutex;
  GemmPolicy policy;
  std::map<Key, GemmChoice> choices;
};

GemmPolicy policy_from_environment() {
  const char* name = std::getenv("MYEXT_CPU_GEMM");
  return name == nullptr || *name == '\0' ? GemmPolicy::kProbe : parse_gemm_policy(name);
}

State& state() {
  static State* s = new State{{}, policy_from_environment(), {}};
  return *s;
}

char layout_of(const at::Tensor& t) {
  if (t.stride(1) == 1) return 'r';
  if (t.stride(0) == 1) return 'c';
  return 's';
}

int64_t next_power_of_two(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

template <typename F>
double seconds_of(const F& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A slice of the operand `t`, laid out as `t` is: a dense one (row- or column-major)
// stays dense, where the slice's view would be padded, which sends oneDNN's linear to a
// slow path (16 s for a 2048 x 256 x 2048 GEMM on the AMD EPYC family 25 model 17)
// that the call itself never takes; any other keeps the view's strides, as the call's.
at::Tensor sliced_like(const at::Tensor& slice, const at::Tensor& t) {
  if (t.is_contiguous()) return slice.contiguous();
  if (t.t().is_contiguous()) return slice.t().contiguous().t();
  return slice;
}

// a (rows, inner) @ b (inner, cols), or, over kProbeWork multiply-adds, a slice of it:
// each dimension above a cap cut to the cap, the largest cap that keeps the slice within
// kProbeWork. So the largest dimension goes first and no dimension is cut below the
// others' sizes: cutting only the largest would time an 8192^3 GEMM on 16 rows, a
// shape that runs nothing like it.
std::pair<at::Tensor, at::Tensor> probe_operands(const at::Tensor& a, const at::Tensor& b) {
  const std::array<int64_t, 3> n{a.size(0), a.size(1), b.size(1)};
  const auto work = [&](int64_t cap) {
    double product = 1;
    for (const int64_t d : n) product *= static_cast<double>(std::min(d, cap));
    return product;
  };
  int64_t low = 1, high = std::max({n[0], n[1], n[2]});
  if (work(high) <= kProbeWork) return {a, b};
  while (high - low > 1) {  // work(low) <= kProbeWork < work(high)
    const int64_t mid = low + (high - low) / 2;
    (work(mid) <= kProbeWork ? low : high) = mid;
  }
  const int64_t rows = std::min(n[0], low), inner = std::min(n[1], low), cols = std::min(n[2], low);
  return {sliced_like(a.narrow(0, 0, rows).narrow(1, 0, inner), a),
          sliced_like(b.narrow(0, 0, inner).narrow(1, 0, cols), b)};
}

GemmChoice probe(const at::Tensor& full_a, const at::Tensor& full_b, const Key& key) {
  const auto [a, b] = probe_operands(full_a, full_b);
  const auto aten = [&] { (void)at::mm(a, b); };
  const auto onednn = [&] { (void)onednn_linear(a, b.t(), std::nullopt); };
  const auto choice = [&](double aten_seconds, double onednn_seconds) {
    return GemmChoice{std::get<0>(key), std::get<1>(key), std::get<2>(key), std::get<3>(key),
                      std::get<4>(key), std::get<5>(key), aten_seconds, onednn_seconds,
                      onednn_seconds < kOneDnnMargin * aten_seconds, a.size(0), a.size(1), b.size(1)};
  };
  // Untimed calls: oneDNN creates (and caches) its primitive, both fault in their
  // outputs' pages and settle their allocations. oneDNN raises where it has no kernel
  // for the dtype (half or bfloat16 on a CPU without their instructions): ATen it is.
  double aten_last = 0.0, onednn_last = 0.0;
  for (int i = 0; i < kWarmUpRuns; ++i) {
    aten_last = seconds_of(aten);
    try {
      onednn_last = seconds_of(onednn);
    } catch (const std::exception&) {  // c10::Error, or dnnl::error from within
      return choice(aten_last, std::numeric_limits<double>::infinity());
    }
  }
  const double first = std::max(aten_last, onednn_last);
  const int runs = std::clamp(static_cast<int>(kProbeSeconds / std::max(first, 1e-9)), kMinRuns, kMaxRuns);
  double aten_best = std::numeric_limits<double>::infinity();
  double onednn_best = aten_best;
  // Interleaved, so that a stall of the machine hits both alike; the minimum of each,
  // the time of a call not stalled.
  for (int i = 0; i < runs; ++i) {
    aten_best = std::min(aten_best, seconds_of(aten));
    onednn_best = std::min(onednn_best, seconds_of(onednn));
  }
  return choice(aten_best, onednn_best);
}

// The op, or nullptr where this torch lacks it or has changed its schema (it is
// internal to torch): then use_onednn says no and at::mm does every GEMM.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto found = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value() || !found->hasSchema()) return std::nullopt;
    const auto& args = found->schema().arguments();
    const std::array<const char*, 6> expected{"X", "W", "B", "attr", "scalars", "algorithm"};
    if (args.size() != expected.size()) return std::nullopt;
    for (size_t i = 0; i < expected.size(); ++i) {
      if (args[i].name() != expected[i]) return std::nullopt;
    }
    return found;
  }();
  return op.has_value() ? &*op : nullptr;
}

}  // namespace

GemmPolicy parse_gemm_policy(const std::string& name) {
  if (name == "probe") return GemmPolicy::kProbe;
  if (name == "aten") return GemmPolicy::kAten;
  if (name == "onednn") return GemmPolicy::kOneDnn;
  TORCH_CHECK(false, "MYEXT_CPU_GEMM must be 'probe', 'aten' or 'onednn', got '", name, "'");
}

const char* gemm_policy_name(GemmPolicy policy) {
  switch (policy) {
    case GemmPolicy::kAten: return "aten";
    case GemmPolicy::kOneDnn: return "onednn";
    case GemmPolicy::kProbe: break;
  }
  return "probe";
}

GemmPolicy gemm_policy() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.policy;
}

void set_gemm_policy(GemmPolicy policy) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.policy = policy;
  s.choices.clear();
}

std::vector<GemmChoice> gemm_choices() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::vector<GemmChoice> out;
  out.reserve(s.choices.size());
  for (const auto& entry : s.choices) out.push_back(entry.second);
  return out;
}

at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& b_t, const std::optional<at::Tensor>& bias) {
  torch::jit::Stack stack{a, b_t, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  onednn_linear_op()->callBoxed(stack);
  return stack.back().toTensor().contiguous();
}

bool use_onednn(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type();
  const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
  if ((dtype != at::kFloat && !reduced) || !at::globalContext().userEnabledMkldnn() ||
      onednn_linear_op() == nullptr) {
    return false;
  }
  const int64_t rows = a.size(0), inner = a.size(1), cols = b.size(1);
  if (rows == 0 || inner == 0 || cols == 0) return false;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  // A pinned oneDNN takes float32 only: only the probe finds out whether this CPU's
  // oneDNN has a kernel for the reduced dtypes.
  if (s.policy != GemmPolicy::kProbe) return s.policy == GemmPolicy::kOneDnn && !reduced;
  const Key key{dtype, next_power_of_two(rows), inner, cols, layout_of(a), layout_of(b)};
  const auto found = s.choices.find(key);
  if (found != s.choices.end()) return found->second.onednn;
  if (s.choices.size() >= kMaxChoices) return false;
  // Measured under the lock: another thread with a GEMM of the same class waits for
  // the answer rather than measuring alongside (two probes would slow each other).
  return s.choices.emplace(key, probe(a, b, key)).first->second.onednn;
}

}  // namespace cpu
}  // namespace myext
