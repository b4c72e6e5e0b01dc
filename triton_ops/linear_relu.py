"""Fused Linear+ReLU in Triton: a tiled GEMM forward, and a backward of one
elementwise pass and two library GEMMs.

Forward is ``relu(X W^T + b)`` with the bias and ReLU applied to the accumulator
before the single store. Backward is, by construction, as fast as the GEMM library:
one Triton pass reads ``dY`` and ``Y`` once and writes the masked gradient
``G = dY * (Y > 0)`` with the column sums of ``G`` (the bias gradient, accumulated
in float32); then ``dX = G W`` and ``dW = G^T X`` are plain ``torch.mm`` calls
(cuBLAS on a GPU), as in the fused-linear kernels of Liger-Kernel and Unsloth. A
GEMM that applies the mask inside its K loop reads ``dY`` and ``Y`` once per tile
of the other operand and cannot use the library's kernels; it ran the backward at
0.14x torch's on an H200.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._host import check, check_floating, check_like, check_optional_vector, check_shape, wrap_triton


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, WIDEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = relu(A (M, K) @ B (K, N) + bias), any strides, accumulated in float32
    (float64 for FP64); bias (N,) where HAS_BIAS.

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
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(0, K, BLOCK_K):
        in_k = offs_k < K - k
        a = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
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
    # NaN stays NaN, as in torch.relu.
    acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    c_ptrs = c_ptr + rows * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _relu_grad_kernel(
    dy_ptr, y_ptr, g_ptr, partial_ptr,
    M, N,
    stride_dym, stride_dyn, stride_ym, stride_yn,
    STORE_G: tl.constexpr, BIAS_GRAD: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """The ReLU's backward over dY and Y (M, N), any strides, in one read of each.

    STORE_G: G = dY * (Y > 0) into g (M, N), contiguous, in its dtype (exact: each
    entry is dY's or zero).
    BIAS_GRAD: partial[pid_m] (N,) = G summed over the ROWS_PER_PROGRAM rows of row
    block pid_m, in float32 (float64 for FP64), whatever dY's dtype; the host sums
    the few rows of partial, so the result does not depend on the order programs run.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_dtype = tl.float64 if FP64 else tl.float32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    # Summed over rows once, after the loop: a (BLOCK_M, BLOCK_N) accumulator
    # needs no reduction across threads per step.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    first = pid_m * ROWS_PER_PROGRAM
    for start in range(first, min(first + ROWS_PER_PROGRAM, M), BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None].to(tl.int64)
        inside = (offs_m < M)[:, None] & in_n[None, :]
        dy = tl.load(dy_ptr + rows * stride_dym + offs_n[None, :] * stride_dyn, mask=inside, other=0.0)
        y = tl.load(y_ptr + rows * stride_ym + offs_n[None, :] * stride_yn, mask=inside, other=0.0)
        # Compared in acc_dtype: the interpreter orders bfloat16 by its bits. A select,
        # not a product: dY's inf or NaN where Y <= 0 gives 0, as torch's relu backward.
        g = tl.where(y.to(acc_dtype) > 0, dy.to(acc_dtype), 0.0)
        if STORE_G:
            tl.store(g_ptr + rows * N + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=inside)
        if BIAS_GRAD:
            acc += g
    if BIAS_GRAD:
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=in_n)


def _config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


# Forward configurations per target, from Triton's matmul tutorials (03 and, for
# Hopper, 09-persistent-matmul); ones that need more shared memory than the GPU has
# (float32's wide tiles on any) are skipped by the autotuner.
# Hopper (sm_90+): wide tiles of BLOCK_K 64, 3-4 stages, 4-8 warps (one or two warp
# groups issuing wgmma); 128 x 256 x 64 in 4 stages takes 192 KiB of the 227.
# Tutorial 09's persistent programs and TMA tensor descriptors are not used: the op
# takes operands of any strides, and a descriptor needs a unit last stride and 16-byte
# aligned base and strides, so it would be a second kernel chosen per call, worth it
# only once a GPU shows this pipelined wgmma GEMM short of cuBLAS.
_HOPPER_CONFIGS = [
    _config(128, 256, 64, stages=3, warps=8),
    _config(128, 256, 64, stages=4, warps=8),
    _config(128, 128, 64, stages=4, warps=8),
    _config(128, 128, 64, stages=4, warps=4),
    _config(128, 128, 128, stages=3, warps=8),
    _config(128, 256, 32, stages=3, warps=8),  # float32 (TF32): the widest that fits
    _config(64, 128, 64, stages=4, warps=4),  # small or skinny problems: more programs
]
# Before Hopper (Ampere, Ada): matmul tutorial 03's list for CUDA.
_PRE_HOPPER_CONFIGS = [
    _config(128, 256, 64, stages=3, warps=8),
    _config(64, 256, 32, stages=4, warps=4),
    _config(128, 128, 32, stages=4, warps=4),
    _config(128, 64, 32, stages=4, warps=4),
    _config(64, 128, 32, stages=4, warps=4),
    _config(128, 32, 32, stages=4, warps=4),
    _config(64, 32, 32, stages=5, warps=2),
    _config(32, 64, 32, stages=5, warps=2),
]
_AUTOTUNE_KEY = ["M", "N", "K", "HAS_BIAS", "INPUT_PRECISION"]
# The interpreter cannot benchmark (it has no GPU): it gets one configuration, the
# first for Hopper (128 x 256 x 64), whose edges tests/test_triton.py exercises.
_GEMM_BY_TARGET = {
    target: triton.autotune(configs=configs[:1] if INTERPRETED else configs, key=_AUTOTUNE_KEY)(_gemm_kernel)
    for target, configs in (("hopper", _HOPPER_CONFIGS), ("pre-hopper", _PRE_HOPPER_CONFIGS))
}
# float64 sums a 3-d tile of products, which must stay small enough for registers.
_FP64_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)
# 256 rows per program: at 4096 x 4096, 16 x 32 programs, and 16 rows of partial sums.
_RELU_GRAD_TILE = dict(BLOCK_M=32, BLOCK_N=128, ROWS_PER_PROGRAM=256)


@functools.lru_cache(maxsize=None)
def _target(device_index: int) -> str:
    return "hopper" if torch.cuda.get_device_capability(device_index)[0] >= 9 else "pre-hopper"


def _autotuned_gemm(device: torch.device):
    if INTERPRETED or device.type != "cuda":
        return _GEMM_BY_TARGET["hopper"]
    return _GEMM_BY_TARGET[_target(device.index if device.index is not None else torch.cuda.current_device())]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(*, F) as (rows, F); a view whenever the leading dimensions allow one."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the bias gradient is summed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own matmul setting, so results match F.linear's.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch_gemm(a, b, c, M, N, K, a_strides, b_strides, *, bias=None) -> None:
    """C (M, N) = relu(A (M, K) @ B (K, N) + bias), A and B given as a tensor and its
    (row, column) strides."""
    if M == 0 or N == 0:
        return
    fp64 = c.dtype == torch.float64
    # The bias pointer is never read without HAS_BIAS: any tensor stands in for it.
    args = (a, b, c, bias if bias is not None else c, M, N, K, *a_strides, *b_strides, *c.stride())
    flags = dict(HAS_BIAS=bias is not None, FP64=fp64, WIDEN=INTERPRETED and c.dtype == torch.bfloat16,
                 INPUT_PRECISION=_input_precision(c.dtype))
    if fp64:
        grid = (triton.cdiv(M, _FP64_TILE["BLOCK_M"]) * triton.cdiv(N, _FP64_TILE["BLOCK_N"]),)
        wrap_triton(_gemm_kernel)[grid](*args, **flags, **_FP64_TILE, num_warps=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        wrap_triton(_autotuned_gemm(c.device))[grid](*args, **flags)


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
                 (weight.stride(1), weight.stride(0)), bias=bias.contiguous() if bias is not None else None)
    return output.view(*input.shape[:-1], out_features)


def linear_relu_backward(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor,
    output_mask: list[bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of relu(input @ weight.T + bias) for (input, weight, bias), each only where
    output_mask asks (None elsewhere): the op myext::linear_relu_backward_triton.

    With G = grad_output * (output > 0): grad_input = G weight, grad_weight = G^T input,
    grad_bias = G summed over rows. One Triton pass writes G (only where a GEMM needs
    it) and the bias gradient's partial sums (only where asked); the GEMMs are torch.mm.
    """
    op = "linear_relu_backward_triton"
    _check_inputs(op, input, weight, None)
    out_shape = (*input.shape[:-1], weight.shape[0])
    for name, t in (("output", output), ("grad_output", grad_output)):
        check_like(op, name, t, "input", input)
        check_shape(op, name, t, out_shape)
    want_input, want_weight, want_bias = output_mask
    if not (want_input or want_weight or want_bias):
        return None, None, None
    out_features = weight.shape[0]
    dy, y, x = _as_rows(grad_output), _as_rows(output), _as_rows(input)
    rows = x.shape[0]
    store_g = want_input or want_weight
    g = x.new_empty((rows, out_features)) if store_g else None
    # One row of partial bias sums per row block (none without rows: their sum is 0).
    row_blocks = triton.cdiv(rows, _RELU_GRAD_TILE["ROWS_PER_PROGRAM"])
    partial = x.new_empty((row_blocks, out_features), dtype=_acc_dtype(x.dtype)) if want_bias else None
    if rows > 0 and out_features > 0:
        # Pointers a flag switches off are never written: any tensor stands in for them.
        grid = (row_blocks, triton.cdiv(out_features, _RELU_GRAD_TILE["BLOCK_N"]))
        wrap_triton(_relu_grad_kernel)[grid](
            dy, y, g if store_g else dy, partial if want_bias else dy, rows, out_features, *dy.stride(),
            *y.stride(), STORE_G=store_g, BIAS_GRAD=want_bias, FP64=x.dtype == torch.float64,
            **_RELU_GRAD_TILE, num_warps=4)
    grad_input = torch.mm(g, weight).view(input.shape) if want_input else None
    # G^T is a transposed view: the GEMM library reads it in place.
    grad_weight = torch.mm(g.t(), x) if want_weight else None
    grad_bias = partial.sum(0).to(weight.dtype) if want_bias else None
    return grad_input, grad_weight, grad_bias
