"""Fused Linear+ReLU in Triton: one tiled GEMM kernel serves forward and backward.

Forward is ``relu(X W^T + b)`` with the bias and ReLU applied to the accumulator
before the single store. Backward never writes the masked gradient
``G = dY * (Y > 0)``: the GEMMs ``dX = G W`` and ``dW = G^T X`` apply the mask as
they load their tiles of dY, and the programs of the first column block of the
``dW`` GEMM also sum those tiles into the bias gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._host import check, check_floating, check_like, check_optional_vector, check_shape, wrap_triton


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, mask_ptr, row_sum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_mm, stride_mk,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, MASK_A: tl.constexpr, ROW_SUM: tl.constexpr,
    FP64: tl.constexpr, WIDEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, K) @ B (K, N), any strides, accumulated in float32 (float64 for FP64).

    HAS_BIAS, RELU: C = relu(A B + bias), bias (N,).
    MASK_A: A is read as A * (mask > 0), mask with A's shape and its own strides.
    ROW_SUM: row_sum (M,) = the rows of the (masked) A summed, in C's dtype.
    WIDEN: A and B are widened to float32 as loaded (for the interpreter, which
    computes bfloat16 on its bit patterns: triton-lang/triton#11584).
    """
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together, so
    # the tiles of B they share are still in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    acc_dtype = tl.float64 if FP64 else tl.float32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    # int64 offsets: M * K alone may pass 2**31 elements.
    rows = offs_m[:, None].to(tl.int64)
    a_ptrs = a_ptr + rows * stride_am + offs_k[None, :] * stride_ak
    mask_ptrs = mask_ptr + rows * stride_mm + offs_k[None, :] * stride_mk
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    row_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for k in range(0, K, BLOCK_K):
        in_k = offs_k < K - k
        a_in = in_m[:, None] & in_k[None, :]
        a = tl.load(a_ptrs, mask=a_in, other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if MASK_A:
            # Compared in acc_dtype: the interpreter orders bfloat16 by its bits.
            keep = tl.load(mask_ptrs, mask=a_in, other=0.0).to(acc_dtype) > 0
            a = tl.where(keep, a, 0.0)
            mask_ptrs += BLOCK_K * stride_mk
        if ROW_SUM:
            row_sum += tl.sum(a.to(acc_dtype), axis=1)
        if FP64:
            # tl.dot's float64 support differs between Triton versions and GPUs;
            # the products summed over K are exact and used only for gradcheck.
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(acc_dtype)[None, :]
    if RELU:
        # NaN stays NaN, as in torch.relu.
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    c_ptrs = c_ptr + rows * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
    # Every column block sums the same rows; the first one stores the result.
    if ROW_SUM and pid_n == 0:
        tl.store(row_sum_ptr + offs_m, row_sum.to(row_sum_ptr.dtype.element_ty), mask=in_m)


@triton.jit
def _masked_column_sum_kernel(
    g_ptr, mask_ptr, out_ptr,
    M, N,
    stride_gm, stride_gn, stride_mm, stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (N,) = sum over rows of g * (mask > 0), both (M, N); one program per BLOCK_N columns."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        inside = (offs_m < M)[:, None] & in_n[None, :]
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn,
                    mask=inside, other=0.0).to(acc.dtype)
        # Compared in acc's dtype: the interpreter orders bfloat16 by its bits.
        keep = tl.load(mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn,
                       mask=inside, other=0.0).to(acc.dtype) > 0
        acc += tl.sum(tl.where(keep, g, 0.0), axis=0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=in_n)


# Configurations from Triton's matmul tutorial, for the GPUs of the last years;
# ones that need more shared memory than a GPU has are skipped by the autotuner.
# The interpreter cannot benchmark (it has no GPU), so it gets the first only.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=5, num_warps=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=5, num_warps=2),
]
_gemm_autotuned = triton.autotune(
    configs=_CONFIGS[:1] if INTERPRETED else _CONFIGS,
    key=["M", "N", "K", "HAS_BIAS", "MASK_A", "ROW_SUM", "INPUT_PRECISION"],
)(_gemm_kernel)
# float64 sums a 3-d tile of products, which must stay small enough for registers.
_FP64_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)
_COLUMN_SUM_TILE = dict(BLOCK_M=32, BLOCK_N=128)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(*, F) as (rows, F); a view whenever the leading dimensions allow one."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own matmul setting, so results match F.linear's.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch_gemm(a, b, c, M, N, K, a_strides, b_strides, *, bias=None, relu=False, mask=None,
                 mask_strides=(0, 0), row_sum=None) -> None:
    """C (M, N) = A (M, K) @ B (K, N), A and B given as a tensor and its (row, column) strides."""
    if M == 0 or N == 0:
        return
    fp64 = c.dtype == torch.float64
    # Pointers a flag switches off are never read: any tensor stands in for them.
    args = (a, b, c, bias if bias is not None else c, mask if mask is not None else a,
            row_sum if row_sum is not None else c, M, N, K, *a_strides, *b_strides, *c.stride(), *mask_strides)
    flags = dict(HAS_BIAS=bias is not None, RELU=relu, MASK_A=mask is not None, ROW_SUM=row_sum is not None,
                 FP64=fp64, WIDEN=INTERPRETED and c.dtype == torch.bfloat16,
                 INPUT_PRECISION=_input_precision(c.dtype))
    if fp64:
        grid = (triton.cdiv(M, _FP64_TILE["BLOCK_M"]) * triton.cdiv(N, _FP64_TILE["BLOCK_N"]),)
        wrap_triton(_gemm_kernel)[grid](*args, **flags, **_FP64_TILE, num_warps=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        wrap_triton(_gemm_autotuned)[grid](*args, **flags)


def _check_inputs(op: str, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The checks of csrc/linear_relu.h."""
    check_floating(op, "input", input)
    check(input.dim() >= 1, op, "input must have at least one dimension, got a 0-d tensor")
    check_like(op, "weight", weight, "input", input)
    check(weight.dim() == 2, op, f"weight must be 2-d, got shape {tuple(weight.shape)}")
    check(input.shape[-1] == weight.shape[1], op,
          f"input's last dimension ({input.shape[-1]}) must equal weight's in_features ({weight.shape[1]})")
    check_optional_vector(op, "bias", bias, weight.shape[0], input)


def linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """relu(input @ weight.T + bias) for input (*, in_features): the op myext::linear_relu_triton.

    Its annotations give it the schema of myext::linear_relu, so on a GPU it is a
    torch.library.triton_op, whose kernels torch.compile sees."""
    _check_inputs("linear_relu_triton", input, weight, bias)
    out_features, in_features = weight.shape
    x = _as_rows(input)
    output = x.new_empty((x.shape[0], out_features))
    # The kernel reads the bias with unit stride; copying a strided one costs one vector.
    _launch_gemm(x, weight, output, x.shape[0], out_features, in_features, x.stride(),
                 (weight.stride(1), weight.stride(0)), bias=bias.contiguous() if bias is not None else None,
                 relu=True)
    return output.view(*input.shape[:-1], out_features)


def linear_relu_backward(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor,
    output_mask: list[bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of relu(input @ weight.T + bias) for (input, weight, bias), each only where
    output_mask asks (None elsewhere): the op myext::linear_relu_backward_triton.

    With G = grad_output * (output > 0): grad_input = G weight, grad_weight = G^T input,
    grad_bias = G summed over rows. G is applied as the GEMMs load grad_output, never stored.
    """
    op = "linear_relu_backward_triton"
    _check_inputs(op, input, weight, None)
    out_shape = (*input.shape[:-1], weight.shape[0])
    for name, t in (("output", output), ("grad_output", grad_output)):
        check_like(op, name, t, "input", input)
        check_shape(op, name, t, out_shape)
    out_features, in_features = weight.shape
    g, y, x = _as_rows(grad_output), _as_rows(output), _as_rows(input)
    rows = x.shape[0]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = x.new_empty((rows, in_features))
        _launch_gemm(g, weight, grad_input, rows, in_features, out_features, g.stride(), weight.stride(),
                     mask=y, mask_strides=y.stride())
        grad_input = grad_input.view(input.shape)
    if output_mask[2]:
        grad_bias = weight.new_empty((out_features,))
    # The weight GEMM's A is G^T: its rows summed are the bias gradient. Without
    # that GEMM (or with no columns to run it over) a column sum of G stands in.
    bias_in_gemm = grad_bias is not None and output_mask[1] and in_features > 0
    if output_mask[1]:
        grad_weight = weight.new_empty((out_features, in_features))
        _launch_gemm(g, x, grad_weight, out_features, in_features, rows, (g.stride(1), g.stride(0)), x.stride(),
                     mask=y, mask_strides=(y.stride(1), y.stride(0)), row_sum=grad_bias if bias_in_gemm else None)
    if grad_bias is not None and not bias_in_gemm and out_features > 0:
        grid = (triton.cdiv(out_features, _COLUMN_SUM_TILE["BLOCK_N"]),)
        wrap_triton(_masked_column_sum_kernel)[grid](g, y, grad_bias, rows, out_features, *g.stride(), *y.stride(),
                                                     **_COLUMN_SUM_TILE)
    return grad_input, grad_weight, grad_bias
