// The CPU GEMMs the ops share, on ATen's BLAS (at::mm: MKL in torch's x86 builds)
// or on oneDNN's matmul, whichever this CPU runs faster for the shape at hand.
//
// Neither wins everywhere: on the project's AMD EPYC CPUs MKL takes its AVX2 path and
// oneDNN runs float32 GEMMs of SimpleNet's and MLP sizes about twice as fast, while on
// its Intel Xeons MKL's AVX-512 path is level or ahead at some of the same shapes
// (docs/BENCHMARKS.md). So the choice is measured, not written down: the first GEMM
// of each shape class (float32, bfloat16 or half) times both libraries on its own
// operands and caches the faster for the process (gemm.cpp); a dtype this CPU's
// oneDNN has no kernel for stays on ATen. MYEXT_CPU_GEMM=aten|onednn pins one instead
// (oneDNN for float32 only), and torch.backends.mkldnn.enabled = False keeps every
// GEMM on ATen.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace myext {
namespace cpu {

// Where the GEMMs go: measured per shape class, or always one library (oneDNN:
// float32 only).
enum class GemmPolicy { kProbe, kAten, kOneDnn };

GemmPolicy gemm_policy();
// Parses "probe", "aten" or "onednn"; throws (c10::Error) on anything else.
GemmPolicy parse_gemm_policy(const std::string& name);
const char* gemm_policy_name(GemmPolicy policy);
// Also forgets the measured choices.
void set_gemm_policy(GemmPolicy policy);

// One measured shape class: a (rows, inner) @ b (inner, cols) of one dtype, with
// rows up to `rows_up_to` (the next power of two) and the operands' layouts.
struct GemmChoice {
  at::ScalarType dtype;
  int64_t rows_up_to, inner, cols;
  char a_layout, b_layout;  // 'r' row-major, 'c' column-major (a transposed view), 's' other
  double aten_seconds, onednn_seconds;  // each the fastest of its timed runs
  bool onednn;
  // The GEMM the probe timed: the first call's own, or a slice of it where that is
  // over the probe's budget of multiply-adds (gemm.cpp, probe_operands).
  int64_t timed_rows, timed_inner, timed_cols;
};
std::vector<GemmChoice> gemm_choices();

// a (rows, inner) @ b_t (cols, inner)^T (+ bias), i.e. F.linear(a, b_t, bias), on
// oneDNN's matmul (through mkldnn::_linear_pointwise, the op torch.compile's CPU
// backend uses for linear layers), as a contiguous (rows, cols) tensor; a and b_t
// may have any strides. Only its GEMM and bias are used: its ReLU post-op would
// turn NaN into 0. Call it where use_onednn says so.
at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& b_t, const std::optional<at::Tensor>& bias);

// Whether a (rows, inner) @ b (inner, cols) should run on oneDNN: never in float64.
bool use_onednn(const at::Tensor& a, const at::Tensor& b);

// a @ b as a contiguous (rows, cols) tensor, on the library use_onednn names.
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(a, b)) return onednn_linear(a, b.t(), std::nullopt);
  return a.mm(b);
}

}  // namespace cpu
}  // namespace myext
