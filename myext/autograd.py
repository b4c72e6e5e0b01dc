"""The torch.autograd.Function subclasses behind myext's ops.

Forward and backward call ops registered in the PyTorch dispatcher (the kernels of
one backend, see myext.backends), so ``torch.compile(fullgraph=True)`` traces them.
When a graph of the backward is asked for (``create_graph=True``), the backward ops
run inside Functions of their own whose formulas are built from torch ops, which
makes double (and higher) backward exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._library import acc_dtype
from .backends import kernels


class FusedLinearReLUFunction(torch.autograd.Function):
    """relu(input @ weight.T + bias) with a fused kernel forward and backward.

    ``FusedLinearReLUFunction.apply(input, weight, bias, backend)``, where backend is
    "cpp", "cuda" or "triton" (arguments already checked; see myext.linear_relu).
    Saves the inputs and the output, whose sign is the ReLU mask: no pre-activation
    or mask tensor is kept.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        output = kernels(backend).linear_relu(input, weight, bias)
        ctx.backend = backend
        ctx.save_for_backward(input, weight, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        input, weight, output = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():
            grads = LinearReLUBackwardFunction.apply(grad_output, input, weight, output, output_mask, ctx.backend)
        else:
            grads = kernels(ctx.backend).linear_relu_backward(grad_output, input, weight, output, output_mask)
        return (*grads, None)


class LinearReLUBackwardFunction(torch.autograd.Function):
    """The backward of Linear+ReLU as a differentiable function, for double backward.

    Its outputs (g W, g^T X, sum(g)) with g = grad_output * (output > 0) are linear in
    g, and the mask is piecewise constant in output, so their gradients are
    d/d grad_output = (gg_X W^T + X gg_W^T + gg_b) * mask, d/dX = g gg_W, d/dW = g^T gg_X.
    """

    @staticmethod
    def forward(ctx: Any, grad_output, input, weight, output, output_mask, backend):
        ctx.save_for_backward(grad_output, input, weight, output)
        return kernels(backend).linear_relu_backward(grad_output, input, weight, output, output_mask)

    @staticmethod
    def backward(ctx: Any, grad_grad_input, grad_grad_weight, grad_grad_bias):
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
        return grad_grad_output, grad_input, grad_weight, None, None, None


def _row_scale(grad_loss: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype):
    """The factor of each row's loss gradient, broadcastable to (R, 1)."""
    g = grad_loss.to(dtype)
    if reduction == 0:
        return g.unsqueeze(1)
    return g / total_weight.to(dtype) if reduction == 1 else g


def _cross_entropy_target_grad(grad_loss, input, weight, total_weight, reduction: int, label_smoothing: float):
    """Gradient for probability targets: d loss_i / d target_ic = -(1 - eps) w_c log_softmax(input)_ic,
    times row i's factor. Built from torch ops, so it differentiates again."""
    acc = acc_dtype(input.dtype)
    grad = torch.log_softmax(input.to(acc), dim=1) * (-(1.0 - label_smoothing))
    if weight is not None:
        grad = grad * weight.to(acc)
    return (grad * _row_scale(grad_loss, total_weight, reduction, acc)).to(input.dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    ``CrossEntropyFunction.apply(input, target, weight, reduction, ignore_index,
    label_smoothing, backend, inplace_backward)`` with reduction 0 (none), 1 (mean) or
    2 (sum); the arguments already checked and reshaped to two dimensions (see
    myext.cross_entropy). Forward keeps only the per-row log-sum-exp and the mean's
    divisor for backward. With ``inplace_backward`` (cpp and cuda backends, contiguous
    logits) backward writes the gradient over the logits and bumps their version, so
    any other autograd node that saved them raises an error instead of reading it.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                reduction: int, ignore_index: int, label_smoothing: float, backend: str,
                inplace_backward: bool = False) -> torch.Tensor:
        loss, lse, total_weight = kernels(backend).cross_entropy_forward(
            input, target, weight, reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(input, target, weight, lse, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)
        ctx.backend = backend
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        input, target, weight, lse, total_weight = ctx.saved_tensors
        reduction, ignore_index, label_smoothing = ctx.options
        grad_input = grad_target = None
        # The target's gradient reads the logits, so it comes before any in-place write.
        if ctx.needs_input_grad[1] and target.is_floating_point():
            grad_target = _cross_entropy_target_grad(grad_loss, input, weight, total_weight, reduction,
                                                     label_smoothing)
        if ctx.needs_input_grad[0]:
            args = (grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing)
            if torch.is_grad_enabled():
                grad_input = CrossEntropyBackwardFunction.apply(*args, ctx.backend)
            elif ctx.inplace_backward:
                torch.ops.myext.cross_entropy_backward_(*args)
                # The dispatcher does not bump versions for custom ops run in backward.
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:
                grad_input = kernels(ctx.backend).cross_entropy_backward(*args)
        return grad_input, grad_target, None, None, None, None, None, None


class CrossEntropyBackwardFunction(torch.autograd.Function):
    """The backward of cross-entropy as a differentiable function, for double backward.

    Row i's gradient is s_i D_i with D_i = a_i p_i - (w q)_i, p_i = softmax(x_i),
    a_i = sum(w q_i) and s_i the upstream gradient (over the mean's divisor). The
    backward recomputes p from the input with torch ops so that it differentiates again.
    """

    @staticmethod
    def forward(ctx: Any, grad_loss, input, target, weight, lse, total_weight, reduction: int, ignore_index: int,
                label_smoothing: float, backend: str):
        ctx.save_for_backward(grad_loss, input, target, weight, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)
        return kernels(backend).cross_entropy_backward(
            grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing)

    @staticmethod
    def backward(ctx: Any, grad_grad_input):
        grad_loss, input, target, weight, total_weight = ctx.saved_tensors
        reduction, ignore_index, eps = ctx.options
        acc = acc_dtype(input.dtype)
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
                None, None, None, None, None, None, None)
