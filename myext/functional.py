"""myext's public functions: drop-in fused versions of torch.nn.functional ops."""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._validation import REDUCTIONS, check_class_indices, check_cross_entropy, check_linear_relu
from .autograd import CrossEntropyFunction, FusedLinearReLUFunction
from .backends import has_inplace_cross_entropy_backward, kernels, resolve_backend


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Applies :math:`\mathrm{ReLU}(x W^T + b)` as one fused op.

    Gives the shapes and results of ``F.relu(F.linear(input, weight, bias))``.

    Args:
        input: ``(*, in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features)``, or ``None``.
        backend: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``; ``None`` picks
            ``$MYEXT_BACKEND`` or the best backend available for the tensors' device.

    Returns:
        ``(*, out_features)``.

    Example::

        >>> x, w, b = torch.randn(64, 784), torch.randn(128, 784), torch.randn(128)
        >>> myext.linear_relu(x, w, b).shape
        torch.Size([64, 128])
    """
    check_linear_relu(input, weight, bias)
    name = resolve_backend(backend, input.device)
    if name == "torch":
        return reference.linear_relu(input, weight, bias)
    if not _needs_grad(input, weight, bias):
        # Nothing to differentiate: the op alone, without autograd.Function's overhead.
        return kernels(name).linear_relu(input, weight, bias)
    return FusedLinearReLUFunction.apply(input, weight, bias, name)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    r"""Cross-entropy between logits and targets, with the semantics of ``F.cross_entropy``.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices (int64) of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)``,
            or class probabilities of the input's shape and dtype.
        weight: a weight per class ``(C)``, or ``None``.
        ignore_index: a class index that contributes neither loss nor gradient
            (class-index targets only).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``. ``"mean"`` divides by the summed
            weights of the targets not ignored (class indices) or by the number of
            rows (probabilities), as PyTorch does; an all-ignored batch gives ``nan``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution.
        backend: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``; ``None`` picks
            ``$MYEXT_BACKEND`` or the best backend available for the tensors' device.
        inplace_backward: write the gradient over the logits' own buffer in backward,
            saving a second ``N x C`` allocation (as flash-attention's cross-entropy
            offers). Only for logits computed by an earlier op, never a leaf tensor;
            after backward they hold their gradient. Should anything else have saved
            the logits for its backward, autograd raises an error rather than let it
            read the gradient. Backends without an in-place kernel (``torch``,
            ``triton``) and non-contiguous logits compute out of place.

    Returns:
        A scalar, or for ``reduction="none"`` the loss of each element of the target's
        batch shape. bfloat16 and float16 inputs are computed in float32 and the loss
        returned in the input's dtype.

    Example::

        >>> logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> torch.allclose(myext.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
        True
    """
    probabilities = check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True would overwrite input, a leaf tensor that requires grad, with "
                         "its own gradient; use it for logits computed by an earlier op")
    name = resolve_backend(backend, input.device)
    if not probabilities and name != "cpp":
        check_class_indices(target, input.size(0) if input.dim() == 1 else input.size(1), ignore_index)

    # The kernels see rows of classes: (R, C) logits and (R,) or (R, C) targets.
    if input.dim() == 1:
        batch_shape = torch.Size([])
        input_2d, target_2d = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        batch_shape = input.shape[:1]
        input_2d, target_2d = input, target
    else:
        batch_shape = input.shape[:1] + input.shape[2:]
        classes = input.size(1)
        input_2d = input.movedim(1, -1).reshape(-1, classes)
        target_2d = target.movedim(1, -1).reshape(-1, classes) if probabilities else target.reshape(-1)

    if name == "torch":
        loss = reference.cross_entropy_2d(input_2d, target_2d, weight, ignore_index, reduction,
                                          float(label_smoothing))
    elif not _needs_grad(input_2d, target_2d):
        loss = kernels(name).cross_entropy_forward(input_2d, target_2d, weight, REDUCTIONS[reduction], ignore_index,
                                                   float(label_smoothing))[0]
    else:
        inplace = (inplace_backward and input_2d.is_contiguous()
                   and has_inplace_cross_entropy_backward(name, input.device))
        loss = CrossEntropyFunction.apply(input_2d, target_2d, weight, REDUCTIONS[reduction], ignore_index,
                                          float(label_smoothing), name, inplace)
    return loss.reshape(batch_shape) if reduction == "none" else loss
