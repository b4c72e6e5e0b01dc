"""Argument checks shared by the ops' public functions (each op adds its own in its module).

Kernels assume what is checked. A bad argument raises a Python exception that names it
and says what was expected; nothing here changes a tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._C._functorch import peek_interpreter_stack as _peek_functorch
from torch.autograd import forward_ad as _forward_ad

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Reduction names and the codes the dispatcher ops take (at::Reduction's).
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def check_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {tensor.dtype}")


def check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``tensor`` on ``ref``'s device and of its dtype."""
    check_same_device(name, tensor, ref_name, ref)
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}: "
                        "expected one dtype")


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}: "
                         "expected all tensors on one device")


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on these tensors must go through the op's autograd Function:
    autograd records it, or forward-mode AD or a torch.func transform is active (their
    tangents and batch dimensions are not visible as ``requires_grad``; the bare
    dispatcher op would drop a tangent without a word)."""
    # A loop, not any() over a generator: this runs on every call of every op.
    if torch.is_grad_enabled():
        for tensor in tensors:
            if tensor is not None and tensor.requires_grad:
                return True
    return transforms_active()


def transforms_active() -> bool:
    """Whether forward-mode AD (a ``forward_ad.dual_level``) or a torch.func transform
    (grad, vjp, jvp, vmap, ...) is active in this thread: two lookups, no tensor read.
    False while torch.compile traces, which supports neither."""
    if torch.compiler.is_compiling():
        return False
    return _forward_ad._current_level >= 0 or _peek_functorch() is not None
