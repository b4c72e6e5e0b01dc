"""The torch.autograd.Function subclasses behind myext's ops.

Forward and backward call ops registered in the PyTorch dispatcher (the kernels of
one backend, see myext.backends), so ``torch.compile(fullgraph=True)`` traces them.
The backward ops have autograd formulas of their own (myext._library), which makes
double backward exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backends import kernels


def linear_relu_grads(
    ops, grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of relu(input @ weight.T + bias) for (input, weight, bias), each only when needed."""
    return ops.linear_relu_backward(grad_output, input, weight, output, list(needs_input_grad[:3]))


def cross_entropy_target_grad(
    grad_loss: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor], total_weight: torch.Tensor,
    reduction: int, label_smoothing: float,
) -> torch.Tensor:
    """Gradient for probability targets: d loss_i / d target_ic = -(1 - eps) w_c log_softmax(input)_ic,
    times the upstream gradient of row i. Built from torch ops, so it differentiates again."""
    logp = torch.log_softmax(input.to(total_weight.dtype), dim=1)
    grad = logp * (-(1.0 - label_smoothing))
    if weight is not None:
        grad = grad * weight.to(grad.dtype)
    if reduction == 0:
        grad = grad * grad_loss.to(grad.dtype).unsqueeze(1)
    elif reduction == 1:
        grad = grad * (grad_loss.to(grad.dtype) / total_weight)
    else:
        grad = grad * grad_loss.to(grad.dtype)
    return grad.to(input.dtype)


def cross_entropy_grads(
    ops, grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    lse: torch.Tensor, total_weight: torch.Tensor, reduction: int, ignore_index: int, label_smoothing: float,
    needs_input_grad: tuple[bool, ...], inplace: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the cross-entropy for (input, target); the target's only for probabilities.

    With ``inplace`` the input's gradient is written over ``input`` itself. That bumps
    its version counter, so any other autograd node that saved the logits raises an
    error instead of reading the gradient as logits.
    """
    grad_input = grad_target = None
    # The target's gradient reads the logits, so it comes before any in-place write.
    if needs_input_grad[1] and target.is_floating_point():
        grad_target = cross_entropy_target_grad(grad_loss, input, weight, total_weight, reduction, label_smoothing)
    if needs_input_grad[0]:
        args = (grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing)
        if inplace and not torch.is_grad_enabled():
            torch.ops.myext.cross_entropy_backward_(*args)
            # The dispatcher does not bump versions for custom ops run in backward.
            torch.autograd.graph.increment_version(input)
            grad_input = input
        else:
            grad_input = ops.cross_entropy_backward(*args)
    return grad_input, grad_target


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
        grads = linear_relu_grads(kernels(ctx.backend), grad_output, input, weight, output, ctx.needs_input_grad)
        return (*grads, None)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    ``CrossEntropyFunction.apply(input, target, weight, reduction, ignore_index,
    label_smoothing, backend, inplace_backward)`` with reduction 0 (none), 1 (mean) or
    2 (sum); the arguments already checked and reshaped to two dimensions (see
    myext.cross_entropy). Forward keeps only the per-row log-sum-exp and the mean's
    divisor for backward. With ``inplace_backward`` (cpp and cuda backends, contiguous
    logits) backward writes the gradient over the logits.
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
        grad_input, grad_target = cross_entropy_grads(
            kernels(ctx.backend), grad_loss, input, target, weight, lse, total_weight, *ctx.options,
            ctx.needs_input_grad, inplace=ctx.inplace_backward)
        return grad_input, grad_target, None, None, None, None, None, None
