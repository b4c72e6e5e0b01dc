"""Cross-entropy in Triton: an online softmax over blocks of each row.

A program handles one row, in blocks of up to MAX_BLOCK_C classes; rows shorter
than that are stacked, several to a program, into tiles of about that size.

With q the target distribution after label smoothing (q = (1 - eps) target + eps / C,
target one-hot for class indices) and w the class weights (ones if none):

    loss = lse * sum(w q) - sum(w q x),    grad = scale * (sum(w q) * softmax(x) - w q).

Forward reads each row once: every block updates the running max and sum of
exponentials, and the weighted sums the loss needs. It writes the loss, the
log-sum-exp and the row's weight in the mean per row; torch ops on the device then
reduce those, with no sync to the host. Backward writes the gradient in one sweep
over the row; for probability targets, and for class targets with both weights and
smoothing, a first pass sums w q over the target and weights, without the logits.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import wrap_triton

# The most elements a program loads at a time: 16 KB of float32, eight per thread
# of 16 warps. Tests lower it to run rows of many blocks cheaply.
MAX_BLOCK_C = 4096


@triton.jit
def _cross_entropy_forward_kernel(
    x_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, row_weight_ptr,
    rows, classes, ignore_index, label_smoothing: tl.float64,
    stride_xr, stride_xc, stride_tr, stride_tc,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For BLOCK_R rows r of x (R, C): loss[r], lse[r] = logsumexp(x[r]) and row_weight[r],
    the row's part of the mean's divisor. The outputs' dtype is the one computed in."""
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Rows past the end repeat the last one: loads need no row mask, stores do.
    row = tl.minimum(row_ids, rows - 1).to(tl.int64)
    acc_dtype = lse_ptr.dtype.element_ty
    # label_smoothing is annotated float64: a Python float otherwise reaches the kernel
    # as float32, and float64 results would carry float32's rounding of it.
    eps = (tl.zeros((), tl.float64) + label_smoothing).to(acc_dtype)
    x_rows = x_ptr + row[:, None] * stride_xr
    cols = tl.arange(0, BLOCK_C)[None, :]

    running_max = tl.full((BLOCK_R,), float("-inf"), acc_dtype)
    sum_exp = tl.zeros((BLOCK_R,), acc_dtype)
    # sum(w q) and sum(w q x), per lane; for class targets q is here only its
    # smoothing part eps / C, the target's part is added after the loop.
    lanes_wq = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
    lanes_wqx = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
    for start in range(0, classes, BLOCK_C):
        offs = start + cols
        inside = offs < classes
        x = tl.load(x_rows + offs * stride_xc, mask=inside, other=float("-inf")).to(acc_dtype)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Until a finite logit is seen, shift by 0: exp(-inf - -inf) would be nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        running_max = new_max
        if PROB_TARGET or SMOOTHING:
            q = eps / classes
            if PROB_TARGET:
                p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
                q += (1 - eps) * p.to(acc_dtype)
            if HAS_WEIGHT:
                wq = q * tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
            else:
                wq = tl.where(inside, q, 0.0)
            lanes_wq += wq
            lanes_wqx += wq * tl.where(inside, x, 0.0)
    # lse rounds at the magnitude of the max: the loss keeps the two apart.
    log_sum = tl.log(sum_exp)
    lse = running_max + log_sum

    # sum(w q (lse - x)) over the lanes.
    loss = tl.zeros((BLOCK_R,), acc_dtype)
    if PROB_TARGET or SMOOTHING:
        sum_wq = tl.sum(lanes_wq, axis=1)
        loss = sum_wq * log_sum + (sum_wq * running_max - tl.sum(lanes_wqx, axis=1))
    if PROB_TARGET:
        row_weight = tl.full((BLOCK_R,), 1.0, acc_dtype)
    else:
        target = tl.load(target_ptr + row * stride_tr)
        kept = target != ignore_index
        # Python checks class indices, but a compiled graph skips that check: an
        # index out of range reads nothing and makes the row NaN.
        valid = kept & (target >= 0) & (target < classes)
        x_target = tl.load(x_ptr + row * stride_xr + target * stride_xc, mask=valid, other=float("nan"))
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target, mask=valid, other=float("nan")).to(acc_dtype)
        else:
            w_target = tl.where(valid, 1.0, float("nan")).to(acc_dtype)
        loss += (1 - eps) * w_target * ((running_max - x_target.to(acc_dtype)) + log_sum)
        loss = tl.where(kept, loss, 0.0)
        row_weight = tl.where(kept, w_target, 0.0)
    stored = row_ids < rows
    tl.store(loss_ptr + row, loss, mask=stored)
    tl.store(lse_ptr + row, lse, mask=stored)
    tl.store(row_weight_ptr + row, row_weight, mask=stored)


@triton.jit
def _cross_entropy_backward_kernel(
    grad_ptr, x_ptr, target_ptr, weight_ptr, lse_ptr, scale_ptr,
    rows, classes, ignore_index, label_smoothing: tl.float64,
    stride_gr, stride_xr, stride_xc, stride_tr, stride_tc, stride_scale,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows r of grad (R, C), unit column stride: scale[r] * (sum(w q) softmax(x[r]) - w q)."""
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = tl.minimum(row_ids, rows - 1).to(tl.int64)
    acc_dtype = lse_ptr.dtype.element_ty
    eps = (tl.zeros((), tl.float64) + label_smoothing).to(acc_dtype)
    x_rows = x_ptr + row[:, None] * stride_xr
    grad_rows = grad_ptr + row[:, None] * stride_gr
    cols = tl.arange(0, BLOCK_C)[None, :]
    lse = tl.load(lse_ptr + row)[:, None]
    scale = tl.load(scale_ptr + row * stride_scale).to(acc_dtype)

    # sum(w q), needed before the first block: summed over the row first unless
    # it is known (q's smoothing part is eps / C, so sum(q) = eps without weights).
    if PROB_TARGET or (SMOOTHING and HAS_WEIGHT):
        lanes_wq = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
        for start in range(0, classes, BLOCK_C):
            offs = start + cols
            inside = offs < classes
            q = eps / classes
            if PROB_TARGET:
                p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
                q += (1 - eps) * p.to(acc_dtype)
            if HAS_WEIGHT:
                lanes_wq += q * tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
            else:
                lanes_wq += tl.where(inside, q, 0.0)
        sum_wq = tl.sum(lanes_wq, axis=1)
    else:
        sum_wq = tl.zeros((BLOCK_R,), acc_dtype) + eps
    if not PROB_TARGET:
        target = tl.load(target_ptr + row * stride_tr)
        kept = target != ignore_index
        valid = kept & (target >= 0) & (target < classes)
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target, mask=valid, other=0.0).to(acc_dtype)
        else:
            w_target = tl.full((BLOCK_R,), 1.0, acc_dtype)
        sum_wq += (1 - eps) * w_target
        # Ignored rows get zeros, even where scale is inf (a mean over no rows);
        # as in forward, an index out of range makes the row NaN.
        scale = tl.where(kept, scale, 0.0)
        scale = tl.where(kept & ~valid, float("nan"), scale)
        target = target[:, None]
    sum_wq = sum_wq[:, None]
    scale = scale[:, None]

    for start in range(0, classes, BLOCK_C):
        offs = start + cols
        inside = offs < classes
        # Lanes past the row get softmax 0 (and no overflow warnings in the interpreter).
        x = tl.load(x_rows + offs * stride_xc, mask=inside, other=float("-inf")).to(acc_dtype)
        if PROB_TARGET:
            p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
            q = (1 - eps) * p.to(acc_dtype) + eps / classes
        else:
            q = tl.where(offs == target, (1 - eps) + eps / classes, eps / classes)
        if HAS_WEIGHT:
            q *= tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
        grad = scale * (sum_wq * tl.exp(x - lse) - q)
        tl.store(grad_rows + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside & (row_ids < rows)[:, None])


def _launch(kernel, *args, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
            label_smoothing: float) -> None:
    """Launches one of the kernels over the rows of input, with tiles sized for its rows."""
    rows, classes = input.shape
    block_c = min(triton.next_power_of_2(max(classes, 1)), MAX_BLOCK_C)
    block_r = min(triton.next_power_of_2(rows), MAX_BLOCK_C // block_c)
    # About eight elements per thread: wide loads with few registers.
    num_warps = max(1, min(16, block_r * block_c // 256))
    wrap_triton(kernel)[(triton.cdiv(rows, block_r),)](
        *args, PROB_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
        SMOOTHING=label_smoothing > 0, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)


def _target_strides(target: torch.Tensor) -> tuple[int, int]:
    return (target.stride(0), target.stride(1)) if target.dim() == 2 else (target.stride(0), 0)


def cross_entropy_forward(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: int, ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C):
    the op myext::cross_entropy_forward_triton.

    Returns the loss (per row for reduction 0, else its mean (1) or sum (2)) in the
    input's dtype, the per-row log-sum-exp and the mean's divisor (the summed weights
    of the targets not ignored, or R), both in float32 (float64 for float64 input).
    """
    rows, classes = input.shape
    acc = torch.promote_types(input.dtype, torch.float32)  # float64 stays, the rest is float32
    losses, lse, row_weight = (input.new_empty((rows,), dtype=acc) for _ in range(3))
    if rows > 0:
        weight = weight.contiguous() if weight is not None else None
        # A pointer the options switch off is never read: the input stands in.
        _launch(_cross_entropy_forward_kernel, input, target, weight if weight is not None else input, losses, lse,
                row_weight, rows, classes, ignore_index, label_smoothing, *input.stride(), *_target_strides(target),
                input=input, target=target, weight=weight, label_smoothing=label_smoothing)
    total_weight = row_weight.sum()
    if reduction == 0:
        loss = losses
    elif reduction == 2:
        loss = losses.sum()
    else:
        loss = losses.sum() / total_weight
    return loss.to(input.dtype), lse, total_weight


def cross_entropy_backward(
    grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    lse: torch.Tensor, total_weight: torch.Tensor, reduction: int, ignore_index: int, label_smoothing: float,
) -> torch.Tensor:
    """Gradient of cross_entropy_forward's loss for the logits (R, C), given the loss's
    gradient grad_loss and forward's lse and total_weight: the op
    myext::cross_entropy_backward_triton."""
    rows, classes = input.shape
    grad_input = torch.empty((rows, classes), dtype=input.dtype, device=input.device)
    if rows > 0:
        # The factor of each row: the upstream gradient, over the mean's divisor.
        scale = grad_loss.to(lse.dtype)
        if reduction == 1:
            scale = scale / total_weight
        weight = weight.contiguous() if weight is not None else None
        _launch(_cross_entropy_backward_kernel, grad_input, input, target, weight if weight is not None else input,
                lse, scale, rows, classes, ignore_index, label_smoothing, grad_input.stride(0), *input.stride(),
                *_target_strides(target), scale.stride(0) if reduction == 0 else 0,
                input=input, target=target, weight=weight, label_smoothing=label_smoothing)
    return grad_input
