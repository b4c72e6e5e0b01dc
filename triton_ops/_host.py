"""Host-side helpers shared by the op modules: launching kernels and checking arguments.

Imports torch only. The checks mirror those of the C++ ops (csrc/checks.h): the host
functions are registered as public dispatcher ops, so a direct call with inconsistent
arguments must raise rather than launch a kernel that reads out of bounds. Like
those, they read no data: none synchronises with a GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import INTERPRETED

if INTERPRETED:
    def wrap_triton(kernel):
        """The kernel itself, launched directly: the interpreter runs it on CPU tensors,
        and torch 2.11 refuses interpreted kernels in torch.library.wrap_triton."""
        return kernel
else:
    # Eagerly it launches the kernel; traced (inside a triton_op) it records it, which is
    # how torch.compile sees the kernels of the ops registered as triton_ops.
    from torch.library import wrap_triton  # noqa: F401


FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check(condition: bool, op: str, message: str) -> None:
    """Raises RuntimeError("<op>: <message>") unless ``condition`` holds."""
    if not condition:
        raise RuntimeError(f"{op}: {message}")


def check_floating(op: str, name: str, tensor: torch.Tensor) -> None:
    check(tensor.dtype in FLOATING, op, f"{name} must be float32, float64, bfloat16 or float16, got {tensor.dtype}")


def check_like(op: str, name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``tensor`` on ``ref``'s device, with its dtype."""
    check(tensor.device == ref.device, op, f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")
    check(tensor.dtype == ref.dtype, op, f"{name} has dtype {tensor.dtype} but {ref_name} has {ref.dtype}")


def check_shape(op: str, name: str, tensor: torch.Tensor, shape: Sequence[int]) -> None:
    check(tuple(tensor.shape) == tuple(shape), op, f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_optional_vector(op: str, name: str, tensor: Optional[torch.Tensor], length: int,
                          ref: torch.Tensor) -> None:
    """``tensor`` is None or of shape (length,), on ``ref``'s device with its dtype."""
    if tensor is not None:
        check_shape(op, name, tensor, (length,))
        check_like(op, name, tensor, "input", ref)


def check_optional_rows(op: str, name: str, tensor: Optional[torch.Tensor], rows: int, ref: torch.Tensor) -> None:
    """``tensor`` is None or (rows,), of any floating dtype, on ``ref``'s device."""
    if tensor is not None:
        check_floating(op, name, tensor)
        check(tensor.device == ref.device, op, f"{name} is on {tensor.device} but input is on {ref.device}")
        check_shape(op, name, tensor, (rows,))
