// Fused Linear+ReLU on the CPU. Each GEMM goes through oneDNN where this CPU
// runs it faster than ATen's BLAS (see gemm.h), else through at::mm /
// at::addmm, the bias inside the GEMM; the ReLU is one vectorised pass over the
// output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../linear_relu.h"
#include "gemm.h"

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <vector>

namespace myext {
namespace {

using at::vec::Vectorized;

// Rows handed to one task: enough that a task moves at least ~32k elements.
int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length));
}

// relu over n elements in place, as torch.relu: NaN stays NaN.
template <typename scalar_t>
void relu_row(scalar_t* row, int64_t n) {
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    // bfloat16 and half as 16-bit integers: a value stays where it is positive (as
    // an integer: sign clear, not zero) or NaN (its magnitude's bits above
    // infinity's); the rest, -0 included, becomes +0. at::vec::maximum of
    // Vectorized<BFloat16> or <Half> is wrong in ATen's AVX-512 build: it turns NaN
    // into 0 and infinity into NaN.
    using IVec = Vectorized<int16_t>;
    const int16_t infinity_bits = std::is_same_v<scalar_t, at::BFloat16> ? 0x7F80 : 0x7C00;
    const IVec zero(0), magnitude(0x7FFF), infinity(infinity_bits);
    int16_t* bits = reinterpret_cast<int16_t*>(row);
    const auto relu = [&](const IVec& v) { return v & ((v > zero) | ((v & magnitude) > infinity)); };
    int64_t c = 0;
    for (; c + IVec::size() <= n; c += IVec::size()) relu(IVec::loadu(bits + c)).store(bits + c);
    if (c < n) relu(IVec::loadu(bits + c, n - c)).store(bits + c, n - c);
  } else {
    using Vec = Vectorized<scalar_t>;
    const Vec zero(scalar_t(0));
    int64_t c = 0;
    for (; c + Vec::size() <= n; c += Vec::size()) at::vec::maximum(Vec::loadu(row + c), zero).store(row + c);
    if (c < n) at::vec::maximum(Vec::loadu(row + c, n - c), zero).store(row + c, n - c);
  }
}

template <typename scalar_t>
void relu_rows(scalar_t* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    relu_row(out + begin * cols, (end - begin) * cols);
  });
}

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  check_linear_relu_inputs("linear_relu", input, weight, bias);
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  // A view when the leading dimensions are contiguous: no copy of the input.
  // (rows spelled out, not -1, so that in_features == 0 reshapes too.)
  const int64_t rows = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  const at::Tensor input_2d = input.reshape({rows, in_features});

  const std::optional<at::Tensor> bias_c =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  // The bias is added inside the GEMM, before its accumulator is rounded, as F.linear
  // does: bias + x.w rounds once (a separate bias pass would round twice, and lose
  // to F.linear where bias and x.w nearly cancel).
  at::Tensor output;
  if (cpu::use_onednn(input_2d, weight.t())) {
    output = cpu::onednn_linear(input_2d, weight, bias_c);
  } else if (bias_c.has_value()) {
    output = at::addmm(*bias_c, input_2d, weight.t());
  } else {
    output = at::mm(input_2d, weight.t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "linear_relu_cpu", [&] {
        relu_rows<scalar_t>(output.data_ptr<scalar_t>(), rows, out_features);
      });

  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features;
  return output.view(out_shape);
}

// gp = g where y > 0, else 0 (a NaN y gives 0, as torch's threshold_backward),
// over n elements; with `sums`, gp is also added into them: in double for
// float32/float64, in float for bfloat16/float16. Those two are widened a vector
// at a time and masked in float: their own comparisons and an element-by-element
// sum would each widen them again.
template <typename scalar_t, typename S>
void mask_row(const scalar_t* g, const scalar_t* y, scalar_t* gp, S* sums, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  int64_t c = 0;
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    using FVec = Vectorized<float>;
    const FVec zero(0.0f);
    for (; c + Vec::size() <= n; c += Vec::size()) {
      const auto [g_low, g_high] = at::vec::convert_to_float<scalar_t>(Vec::loadu(g + c));
      const auto [y_low, y_high] = at::vec::convert_to_float<scalar_t>(Vec::loadu(y + c));
      const FVec low = FVec::blendv(zero, g_low, y_low > zero);
      const FVec high = FVec::blendv(zero, g_high, y_high > zero);
      at::vec::convert_from_float<scalar_t>(low, high).store(gp + c);
      if (sums != nullptr) {
        (FVec::loadu(sums + c) + low).store(sums + c);
        (FVec::loadu(sums + c + FVec::size()) + high).store(sums + c + FVec::size());
      }
    }
  } else {
    const Vec zero(scalar_t(0));
    for (; c + Vec::size() <= n; c += Vec::size()) {
      Vec::blendv(zero, Vec::loadu(g + c), Vec::loadu(y + c) > zero).store(gp + c);
    }
    if (sums != nullptr) {
      for (int64_t i = 0; i < c; ++i) sums[i] += static_cast<S>(gp[i]);
    }
  }
  for (; c < n; ++c) {
    gp[c] = y[c] > scalar_t(0) ? g[c] : scalar_t(0);
    if (sums != nullptr) sums[c] += static_cast<S>(gp[c]);
  }
}

// grad_pre = grad_output * (output > 0); grad_bias (unless null) = grad_pre
// summed over rows.
// Rows are split into a fixed number of blocks whose partial bias sums are
// added in block order, so the result does not depend on the thread count.
// Each block's sum is in double for float32 and float64 (a running sum down
// thousands of rows would otherwise be less precise than PyTorch's pairwise
// one), in float for bfloat16 and float16, whose gradient keeps 8 or 11 bits;
// the blocks are added in double.
template <typename scalar_t>
void relu_backward_rows(const scalar_t* grad_out, const scalar_t* out,
                        scalar_t* grad_pre, scalar_t* grad_bias, int64_t rows,
                        int64_t cols) {
  using acc_t = std::conditional_t<c10::is_reduced_floating_point_v<scalar_t>, float, double>;
  constexpr int64_t kMaxBlocks = 64;
  const int64_t block_rows =
      std::max<int64_t>(rows_per_task(cols), (rows + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = rows == 0 ? 0 : (rows + block_rows - 1) / block_rows;
  std::vector<acc_t> partial(
      grad_bias == nullptr ? 0 : static_cast<size_t>(blocks * cols), acc_t(0));

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      acc_t* sums = grad_bias == nullptr ? nullptr : partial.data() + b * cols;
      const int64_t row_end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < row_end; ++r) {
        mask_row(grad_out + r * cols, out + r * cols, grad_pre + r * cols, sums, cols);
      }
    }
  });

  if (grad_bias == nullptr) return;
  // Block by block down contiguous rows of partial sums (columns split across threads
  // beyond 4096 of them): the same additions in the same order as column by column,
  // without a walk that strides a row of partial sums per addition (at 512 x 4096 it
  // took longer than masking the gradient).
  at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
    std::vector<double> totals(static_cast<size_t>(end - begin), 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      const acc_t* row = partial.data() + b * cols + begin;
      for (int64_t c = 0; c < end - begin; ++c) totals[c] += static_cast<double>(row[c]);
    }
    for (int64_t c = begin; c < end; ++c) grad_bias[c] = static_cast<scalar_t>(totals[c - begin]);
  });
}

// One fused pass masks grad_output and reduces the bias gradient; the input
// and weight gradients are then two GEMMs of the masked gradient.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
linear_relu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight, const at::Tensor& output,
                         std::array<bool, 3> output_mask) {
  check_linear_relu_backward_inputs("linear_relu_backward", grad_output, input, weight, output);
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor out_c = output.contiguous();
  const int64_t rows = c10::multiply_integers(output.sizes().slice(0, output.dim() - 1));

  at::Tensor grad_pre = at::empty({rows, out_features}, output.options());
  at::Tensor grad_bias = at::empty({out_features}, output.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, output.scalar_type(), "linear_relu_backward_cpu",
      [&] {
        relu_backward_rows<scalar_t>(
            grad_c.data_ptr<scalar_t>(), out_c.data_ptr<scalar_t>(),
            grad_pre.data_ptr<scalar_t>(),
            output_mask[2] ? grad_bias.data_ptr<scalar_t>() : nullptr, rows,
            out_features);
      });

  std::optional<at::Tensor> grad_input, grad_weight;
  if (output_mask[0]) {
    grad_input = cpu::gemm(grad_pre, weight).view(input.sizes());
  }
  if (output_mask[1]) {
    // G^T @ X: at::mm reads G^T in place, oneDNN's linear first copies it, which the
    // probe's timing of the two includes.
    grad_weight = cpu::gemm(grad_pre.t(), input.reshape({rows, in_features}));
  }
  return {grad_input, grad_weight,
          output_mask[2] ? std::optional<at::Tensor>(grad_bias) : std::nullopt};
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

}  // namespace myext
