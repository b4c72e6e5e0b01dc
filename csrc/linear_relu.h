// The argument checks of the Linear+ReLU ops, shared by their CPU and CUDA
// kernels (schemas in myext.cpp).
#pragma once

#include "checks.h"

#include <vector>

namespace myext {

// input (*, in_features); weight (out_features, in_features) and bias
// (out_features) or absent, of the input's dtype and device.
inline void check_linear_relu_inputs(const char* op, const at::Tensor& input,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension, got a 0-d tensor");
  check_like(op, "weight", weight, input);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input's last dimension (", input.size(-1),
              ") must equal weight's in_features (", weight.size(1), ")");
  check_optional_vector(op, "bias", bias, weight.size(0), input);
}

// grad_output and output (*, out_features), with input's leading dimensions.
inline void check_linear_relu_backward_inputs(const char* op, const at::Tensor& grad_output,
                                              const at::Tensor& input, const at::Tensor& weight,
                                              const at::Tensor& output) {
  check_linear_relu_inputs(op, input, weight, std::nullopt);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = weight.size(0);
  check_like(op, "output", output, input);
  check_shape(op, "output", output, shape);
  check_like(op, "grad_output", grad_output, input);
  check_shape(op, "grad_output", grad_output, shape);
}

}  // namespace myext
