"""Fake kernels and autograd formulas for the myext ops, in one place.

The fake kernels give output shapes without computing, so torch.compile and
torch.library.opcheck can trace the ops. The autograd formulas make each op
differentiable when called directly, and make the backward ops differentiable,
which gives exact double backward through the autograd functions.

``register(suffix)`` attaches both to the four ops named with that suffix: ""
for the C++/CUDA ops of csrc/, "_triton" for those of triton_ops/.
"""

from __future__ import annotations

import torch

from .autograd import cross_entropy_grads, linear_relu_grads
from .backends import Kernels


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_relu_fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


def linear_relu_backward_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
    """Differentiates (g W, g^T X, sum(g)) with g = grad_output * (output > 0) once more.

    All three are linear in g, and the mask is piecewise constant in output, so:
    d/d grad_output = (gg_X W^T + X gg_W^T + gg_b) * mask, d/dX = g gg_W, d/dW = g^T gg_X.
    Built from torch ops, so it differentiates again.
    """
    grad_output, input, weight, output = ctx.saved_tensors
    mask = output > 0
    out_features, in_features = weight.shape
    grad_pre = torch.zeros_like(output)
    if grad_grad_input is not None:
        grad_pre = grad_pre + torch.matmul(grad_grad_input, weight.t())
    if grad_grad_weight is not None:
        grad_pre = grad_pre + torch.matmul(input, grad_grad_weight.t())
    if grad_grad_bias is not None:
        grad_pre = grad_pre + grad_grad_bias
    grad_grad_output = torch.where(mask, grad_pre, torch.zeros_like(grad_pre))

    masked = torch.where(mask, grad_output, torch.zeros_like(grad_output)).reshape(-1, out_features)
    grad_input = grad_weight = None
    if grad_grad_weight is not None and ctx.needs_input_grad[1]:
        grad_input = masked.mm(grad_grad_weight).reshape(input.shape)
    if grad_grad_input is not None and ctx.needs_input_grad[2]:
        grad_weight = masked.t().mm(grad_grad_input.reshape(-1, in_features))
    return grad_grad_output, grad_input, grad_weight, None, None


def cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    rows = input.shape[0]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    return loss, input.new_empty((rows,), dtype=acc), input.new_empty((), dtype=acc)


def cross_entropy_backward_fake(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
                                label_smoothing):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, lse, total_weight, reduction,
                                        ignore_index, label_smoothing):
    return None


def _row_scale(grad_loss: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype):
    """The factor each row's loss gradient is multiplied by, broadcastable to (R, 1)."""
    g = grad_loss.to(dtype)
    if reduction == 0:
        return g.unsqueeze(1)
    return g / total_weight.to(dtype) if reduction == 1 else g


def cross_entropy_backward_backward(ctx, grad_grad_input):
    """Differentiates grad_input = s_i * (a_i * softmax(x)_i - (w q)_i) once more.

    Row i's loss gradient is D_i = a_i p_i - w q_i with p_i = softmax(x_i) and
    a_i = sum(w q_i), scaled by s_i (the upstream gradient, over the mean's divisor).
    Recomputes p from the input with torch ops so that it differentiates again.
    """
    grad_loss, input, target, weight, total_weight = ctx.saved_tensors
    reduction, ignore_index, eps = ctx.options
    acc = _acc_dtype(input.dtype)
    classes = input.shape[1]
    p = torch.softmax(input.to(acc), dim=1)
    w = weight.to(acc) if weight is not None else torch.ones(classes, dtype=acc, device=input.device)
    if target.is_floating_point():
        wq = w * (target.to(acc) * (1.0 - eps) + eps / classes)
        a = wq.sum(dim=1)
    else:
        kept = target != ignore_index
        safe_target = torch.where(kept, target, torch.zeros_like(target))
        w_target = w[safe_target] * kept
        a = (1.0 - eps) * w_target + (eps / classes) * w.sum() * kept
        one_hot = torch.nn.functional.one_hot(safe_target, classes).to(acc)
        wq = (1.0 - eps) * w_target.unsqueeze(1) * one_hot + (eps / classes) * w * kept.unsqueeze(1)
    gg = grad_grad_input.to(acc)
    scale = _row_scale(grad_loss, total_weight, reduction, acc)
    gg_dot_p = (gg * p).sum(dim=1, keepdim=True)

    per_row = (gg * (a.unsqueeze(1) * p - wq)).sum(dim=1)
    if reduction == 0:
        grad_grad_loss = per_row
    elif reduction == 1:
        grad_grad_loss = per_row.sum() / total_weight
    else:
        grad_grad_loss = per_row.sum()
    grad_input = scale * a.unsqueeze(1) * p * (gg - gg_dot_p)
    grad_target = None
    if target.is_floating_point() and ctx.needs_input_grad[2]:
        grad_target = (scale * (1.0 - eps) * w * (gg_dot_p - gg)).to(target.dtype)
    return (grad_grad_loss.to(grad_loss.dtype), grad_input.to(input.dtype), grad_target,
            None, None, None, None, None, None)


def register_inplace() -> None:
    """Attaches the fake kernel of myext::cross_entropy_backward_ (C++ and CUDA backends only)."""
    torch.library.register_fake("myext::cross_entropy_backward_", cross_entropy_backward_inplace_fake)


def register(suffix: str) -> None:
    """Attaches fake kernels and autograd formulas to the myext ops named with ``suffix``."""
    names = [name + suffix for name in Kernels._fields]
    ops = Kernels(*(getattr(torch.ops.myext, name) for name in names))
    qualified = dict(zip(Kernels._fields, (f"myext::{name}" for name in names)))

    torch.library.register_fake(qualified["linear_relu"], linear_relu_fake)
    torch.library.register_fake(qualified["linear_relu_backward"], linear_relu_backward_fake)
    torch.library.register_fake(qualified["cross_entropy_forward"], cross_entropy_forward_fake)
    torch.library.register_fake(qualified["cross_entropy_backward"], cross_entropy_backward_fake)

    def linear_relu_setup(ctx, inputs, output):
        input, weight, _ = inputs
        ctx.save_for_backward(input, weight, output)

    def linear_relu_backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        return linear_relu_grads(ops, grad_output, input, weight, output, ctx.needs_input_grad)

    def linear_relu_backward_setup(ctx, inputs, output):
        grad_output, input, weight, relu_output, _ = inputs
        ctx.save_for_backward(grad_output, input, weight, relu_output)

    def ce_forward_setup(ctx, inputs, output):
        input, target, weight, reduction, ignore_index, label_smoothing = inputs
        _, lse, total_weight = output
        ctx.mark_non_differentiable(lse, total_weight)
        ctx.save_for_backward(input, target, weight, lse, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)

    def ce_forward_backward(ctx, grad_loss, _grad_lse, _grad_total_weight):
        input, target, weight, lse, total_weight = ctx.saved_tensors
        grad_input, grad_target = cross_entropy_grads(
            ops, grad_loss, input, target, weight, lse, total_weight, *ctx.options, ctx.needs_input_grad)
        return grad_input, grad_target, None, None, None, None

    def ce_backward_setup(ctx, inputs, output):
        grad_loss, input, target, weight, _, total_weight, reduction, ignore_index, label_smoothing = inputs
        ctx.save_for_backward(grad_loss, input, target, weight, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)

    torch.library.register_autograd(qualified["linear_relu"], linear_relu_backward, setup_context=linear_relu_setup)
    torch.library.register_autograd(qualified["linear_relu_backward"], linear_relu_backward_backward,
                                    setup_context=linear_relu_backward_setup)
    torch.library.register_autograd(qualified["cross_entropy_forward"], ce_forward_backward,
                                    setup_context=ce_forward_setup)
    torch.library.register_autograd(qualified["cross_entropy_backward"], cross_entropy_backward_backward,
                                    setup_context=ce_backward_setup)
