// Fused Linear+ReLU on CUDA.
//
// Forward is one cuBLASLt matmul whose epilogue adds the bias and applies the
// ReLU, so the pre-activation never reaches memory. Where cuBLASLt refuses
// (float64, operands not 16-byte aligned, empty shapes) the GEMM goes through
// at::addmm, the bias inside it, and our own kernel applies the ReLU.
//
// The output's sign is the ReLU mask that backward needs, so forward keeps no
// aux mask (CUBLASLT_EPILOGUE_RELU_AUX_BIAS). For the same reason backward
// cannot use cuBLASLt's DRELU_BGRAD epilogue, which reads that aux bit-mask and
// which our op schema does not carry: our own kernel masks grad_output and sums
// the bias gradient in one read, and the two weight/input GEMMs run on cuBLAS.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../linear_relu.h"
#include "common.cuh"

namespace myext {
namespace cuda {
namespace {

template <typename T>
using LtPtr = std::unique_ptr<std::remove_pointer_t<T>, cublasStatus_t (*)(T)>;

LtPtr<cublasLtMatrixLayout_t> make_layout(cudaDataType_t type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  return {layout, &cublasLtMatrixLayoutDestroy};
}

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                   const T& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

template <typename T>
void set_preference(cublasLtMatmulPreference_t pref,
                    cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  TORCH_CUDABLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

// The largest power of two (up to 256) that divides the address: heuristics
// otherwise assume 256-byte alignment and may pick a kernel that faults on a
// tensor view with an offset.
uint32_t alignment_of(const void* ptr) {
  uint32_t alignment = 256;
  while (!is_aligned(ptr, alignment)) alignment /= 2;
  return alignment;
}

// out = relu(x @ w.T + bias) with the epilogue fused into a cuBLASLt matmul.
// Returns false, having done nothing, where cuBLASLt cannot take the problem.
bool lt_linear_relu(const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& bias, at::Tensor& out) {
  cudaDataType_t data_type;
  switch (x.scalar_type()) {
    case at::kFloat: data_type = CUDA_R_32F; break;
    case at::kHalf: data_type = CUDA_R_16F; break;
    case at::kBFloat16: data_type = CUDA_R_16BF; break;
    default: return false;
  }
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t out_features = w.size(0);
  const int64_t elem = x.element_size();
  if (rows == 0 || in_features == 0 || out_features == 0) return false;
  // cuBLASLt wants every operand and leading dimension 16-byte aligned.
  if ((in_features * elem) % 16 != 0 || (out_features * elem) % 16 != 0) return false;
  for (const void* ptr : {x.data_ptr(), w.data_ptr(), out.data_ptr()}) {
    if (!is_aligned(ptr, 16)) return false;
  }
  if (bias.defined() && !is_aligned(bias.data_ptr(), 16)) return false;

  // Column-major view of the row-major problem: out.T (N x M) = w (K x N).T @ x.T (K x M).
  const cublasComputeType_t compute_type =
      x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS()
          ? CUBLAS_COMPUTE_32F_FAST_TF32
          : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t raw_desc = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute_type, CUDA_R_32F));
  const LtPtr<cublasLtMatmulDesc_t> desc(raw_desc, &cublasLtMatmulDescDestroy);
  set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE,
                bias.defined() ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU);
  if (bias.defined()) {
    set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.data_ptr());
  }
  const auto a_layout = make_layout(data_type, in_features, out_features, in_features);
  const auto b_layout = make_layout(data_type, in_features, rows, in_features);
  const auto d_layout = make_layout(data_type, out_features, rows, out_features);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const LtPtr<cublasLtMatmulPreference_t> pref(raw_pref, &cublasLtMatmulPreferenceDestroy);
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  set_preference(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size);
  set_preference(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(w.data_ptr()));
  set_preference(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(x.data_ptr()));
  set_preference(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(out.data_ptr()));
  set_preference(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(out.data_ptr()));

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, desc.get(), a_layout.get(), b_layout.get(), d_layout.get(),
      d_layout.get(), pref.get(), 1, &heuristic, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;

  const float alpha = 1.0f;
  const float beta = 0.0f;
  // PyTorch's own Lt workspace: allocated by its caching allocator, one per
  // handle and stream, so it is never in use by another kernel concurrently.
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(
      handle, desc.get(), &alpha, w.data_ptr(), a_layout.get(), x.data_ptr(),
      b_layout.get(), &beta, out.data_ptr(), d_layout.get(), out.data_ptr(),
      d_layout.get(), &heuristic.algo, at::cuda::getCUDABlasLtWorkspace(),
      workspace_size, at::cuda::getCurrentCUDAStream()));
  return true;
}

constexpr int kEpilogueThreads = 256;

// out = relu(out) in place: the epilogue of the at::mm / at::addmm fallback.
template <typename scalar_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    relu_kernel(scalar_t* out, int64_t rows, int64_t cols) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    scalar_t& value = out[row * cols + col];
    // Written so that NaN stays NaN, as in torch.relu.
    value = value < scalar_t(0) ? scalar_t(0) : value;
  }
}

at::Tensor linear_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  check_linear_relu_inputs("linear_relu", input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  // A view, not a copy, when the leading dimensions are contiguous.
  const at::Tensor x = input.reshape({c10::multiply_integers(input.sizes().slice(0, input.dim() - 1)), in_features}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows = x.size(0);
  at::Tensor output = at::empty({rows, out_features}, input.options());

  if (!lt_linear_relu(x, w, b, output)) {
    // The bias inside the GEMM rounds bias + x.w once, as cuBLASLt's epilogue and
    // F.linear do, not twice.
    if (b.defined()) {
      at::addmm_out(output, b, x, w.t());
    } else {
      at::mm_out(output, x, w.t());
    }
    if (rows > 0 && out_features > 0) {
      const dim3 grid(static_cast<unsigned>(ceil_div(out_features, kEpilogueThreads)),
                      static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, x.scalar_type(), "linear_relu_cuda", [&] {
            relu_kernel<scalar_t><<<grid, kEpilogueThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                output.data_ptr<scalar_t>(), rows, out_features);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    }
  }

  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features;
  return output.view(out_shape);
}

// A block covers kColThreads packs of columns; its kRowThreads rows of
// threads stride down its share of the rows.
constexpr int kColThreads = 32;
constexpr int kRowThreads = 8;
// Enough resident blocks of kColThreads x kRowThreads threads to fill an SM.
constexpr int kBlocksPerSm = 8;

// grad_pre = grad_out * (out > 0), written when grad_pre is not null, and
// each block's column sums of grad_pre into row blockIdx.y of bias_partial
// when that is not null: one read of grad_out and out for both.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kColThreads* kRowThreads)
    relu_grad_bias_kernel(const scalar_t* grad_out, const scalar_t* out,
                          scalar_t* grad_pre, acc_t* bias_partial, int64_t rows,
                          int64_t cols, int64_t rows_per_block) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * VEC;
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = std::min(rows, row_begin + rows_per_block);
  acc_t sums[VEC] = {};
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowThreads) {
      const int64_t offset = row * cols + col;
      auto grad = load_pack<VEC>(grad_out + offset);
      const auto y = load_pack<VEC>(out + offset);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (!(static_cast<acc_t>(y.val[i]) > acc_t(0))) grad.val[i] = scalar_t(0);
        sums[i] += static_cast<acc_t>(grad.val[i]);
      }
      if (grad_pre != nullptr) store_pack(grad_pre + offset, grad);
    }
  }
  if (bias_partial == nullptr) return;

  __shared__ acc_t block_sums[kRowThreads][kColThreads * VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) block_sums[threadIdx.y][threadIdx.x * VEC + i] = sums[i];
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    acc_t total = 0;
    for (int r = 0; r < kRowThreads; ++r) total += block_sums[r][threadIdx.x * VEC + i];
    bias_partial[blockIdx.y * cols + col + i] = total;
  }
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
linear_relu_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                          const at::Tensor& weight, const at::Tensor& output,
                          std::array<bool, 3> output_mask) {
  check_linear_relu_backward_inputs("linear_relu_backward", grad_output, input, weight, output);
  const c10::cuda::CUDAGuard guard(output.device());
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor out_c = output.contiguous();
  // Counted from the leading dimensions, not numel / out_features, which is 0
  // when out_features is.
  const int64_t rows = c10::multiply_integers(output.sizes().slice(0, output.dim() - 1));
  const bool need_pre = output_mask[0] || output_mask[1];
  const auto acc_type = at::toOpMathType(output.scalar_type());

  at::Tensor grad_pre = need_pre ? at::empty({rows, out_features}, output.options()) : at::Tensor();
  at::Tensor bias_partial;
  if (need_pre || output_mask[2]) {
    const bool packed = (out_features * output.element_size()) % 16 == 0 &&
                        is_aligned(grad_c.data_ptr(), 16) && is_aligned(out_c.data_ptr(), 16) &&
                        (!need_pre || is_aligned(grad_pre.data_ptr(), 16));
    const int64_t vec = packed ? 16 / output.element_size() : 1;
    const int64_t col_blocks = std::max<int64_t>(1, ceil_div(out_features, kColThreads * vec));
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t wanted_row_blocks = ceil_div(int64_t{kBlocksPerSm} * sms, col_blocks);
    const int64_t rows_per_block = std::max<int64_t>(kRowThreads, ceil_div(rows, wanted_row_blocks));
    const int64_t row_blocks = ceil_div(rows, rows_per_block);
    if (output_mask[2]) {
      bias_partial = at::empty({row_blocks, out_features}, output.options().dtype(acc_type));
    }
    if (rows > 0 && out_features > 0) {
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
      const dim3 block(kColThreads, kRowThreads);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, output.scalar_type(), "linear_relu_backward_cuda", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            auto launch = [&](auto pack_width) {
              relu_grad_bias_kernel<scalar_t, acc_t, decltype(pack_width)::value>
                  <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
                      grad_c.data_ptr<scalar_t>(), out_c.data_ptr<scalar_t>(),
                      need_pre ? grad_pre.data_ptr<scalar_t>() : nullptr,
                      output_mask[2] ? bias_partial.data_ptr<acc_t>() : nullptr, rows,
                      out_features, rows_per_block);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            };
            if (packed) {
              launch(std::integral_constant<int, kPack16<scalar_t>>{});
            } else {
              launch(std::integral_constant<int, 1>{});
            }
          });
    }
  }

  std::optional<at::Tensor> grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = grad_pre.mm(weight).view(input.sizes());
  if (output_mask[1]) grad_weight = grad_pre.t().mm(input.reshape({rows, in_features}));
  if (output_mask[2]) grad_bias = bias_partial.sum(0).to(output.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(myext, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace cuda
}  // namespace myext
