"""Fake kernels for the myext ops, in one place.

They give output shapes and dtypes without computing, so torch.compile and
torch.library.opcheck can trace the ops. ``register(suffix)`` attaches them to the
four ops named with that suffix: "" for the C++/CUDA ops of csrc/, "_triton" for
those of triton_ops/.

The ops carry no autograd formulas of their own: myext.autograd's Functions
differentiate them (a Python autograd kernel on each op would cost every call a
trip through Python, tens of microseconds at small sizes).
"""

from __future__ import annotations

import torch

from .backends import Kernels


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_relu_fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


def cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    rows = input.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    return loss, input.new_empty((rows,), dtype=acc), input.new_empty((), dtype=acc)


def cross_entropy_backward_fake(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
                                label_smoothing):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, lse, total_weight, reduction,
                                        ignore_index, label_smoothing):
    return None


def register_inplace() -> None:
    """Attaches the fake kernel of myext::cross_entropy_backward_ (C++ and CUDA backends only)."""
    torch.library.register_fake("myext::cross_entropy_backward_", cross_entropy_backward_inplace_fake)


def register(suffix: str) -> None:
    """Attaches the fake kernels to the myext ops named with ``suffix``."""
    fakes = Kernels(linear_relu_fake, linear_relu_backward_fake, cross_entropy_forward_fake,
                    cross_entropy_backward_fake)
    for name, fake in zip(Kernels._fields, fakes):
        torch.library.register_fake(f"myext::{name}{suffix}", fake)
