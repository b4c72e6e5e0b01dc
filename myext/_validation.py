"""Argument checks shared by every backend.

Kernels assume what is checked here. A bad argument raises a Python exception that
names it and says what was expected; nothing here changes a tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _check_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {tensor.dtype}")


def _check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}: "
                         "expected all tensors on one device")
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}: "
                        "expected one dtype")


def check_linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_float_dtype("input", input)
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (*, in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d (out_features, in_features), got shape {tuple(weight.shape)}")
    _check_same("weight", weight, "input", input)
    if input.size(-1) != weight.size(1):
        raise ValueError(f"input's last dimension ({input.size(-1)}) must equal weight's in_features "
                         f"(weight.shape[1] = {weight.size(1)}); input shape {tuple(input.shape)}, "
                         f"weight shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, "input", input)
        if bias.shape != (weight.size(0),):
            raise ValueError(f"bias must have shape ({weight.size(0)},) to match weight's out_features, "
                             f"got {tuple(bias.shape)}")


def check_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> bool:
    """Checks the arguments of cross_entropy; returns True for probability targets."""
    _check_tensor("input", input)
    _check_tensor("target", target)
    _check_float_dtype("input", input)
    if input.dim() < 1:
        raise ValueError("input must be (C), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}: "
                         "expected all tensors on one device")
    classes = input.size(0) if input.dim() == 1 else input.size(1)
    if weight is not None:
        _check_tensor("weight", weight)
        _check_same("weight", weight, "input", input)
        if weight.shape != (classes,):
            raise ValueError(f"weight must have one entry per class, shape ({classes},), "
                             f"got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight requires grad, but myext does not differentiate the class weights; "
                             "pass weight.detach()")

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"a floating-point target holds class probabilities and must have the "
                             f"input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
        _check_same("target", target, "input", input)
        if ignore_index != -100:
            raise ValueError(f"ignore_index ({ignore_index}) applies to class-index targets only, "
                             "not to a floating-point target of probabilities")
        return True

    if target.dtype != torch.int64:
        raise TypeError(f"target must hold class indices as int64 (or probabilities of the input's "
                        f"dtype), got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target of class indices must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def check_class_indices(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Raises IndexError for a class index outside [0, classes) that is not ignore_index.

    It reads the values (a host sync on a GPU), which a traced graph does not have,
    so it is skipped while compiling, and for the C++ kernels, which raise the same
    error as they read. In a compiled graph the CUDA kernels assert on such an index
    and the Triton kernels give its row a nan loss; neither reads out of bounds.
    """
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        value = target[bad].flatten()[0].item()
        raise IndexError(f"target holds class index {value}, expected values in [0, {classes}) "
                         f"or ignore_index ({ignore_index})")
