"""Cross-entropy of logits against class indices or class probabilities.

Dispatcher ops (schemas in csrc/myext.cpp): ``myext::cross_entropy_forward``,
``myext::cross_entropy_backward`` and, where a backend has it, the in-place
``myext::cross_entropy_backward_``; kernels in csrc/cpu/cross_entropy.cpp,
csrc/cuda/cross_entropy.cu and triton_ops/cross_entropy.py. This module holds the
rest of the op: its argument checks, fake kernels, autograd Functions, the public
function with the semantics of ``F.cross_entropy``, the plain-PyTorch reference, and
its registry spec (samples and benchmark cases).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import registry
from .._library import acc_dtype
from .._validation import REDUCTIONS, check_float_dtype, check_same, check_tensor, needs_grad
from ..backends import has_capability, op, resolve_backend

__all__ = ["CrossEntropyBackwardFunction", "CrossEntropyFunction", "cross_entropy", "cross_entropy_2d",
           "reference"]

NAME = "cross_entropy"
INPLACE_BACKWARD = "inplace_backward"


# --------------------------------------------------------------------------- checks

def check_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> bool:
    """Checks the arguments of cross_entropy; returns True for probability targets."""
    check_tensor("input", input)
    check_tensor("target", target)
    check_float_dtype("input", input)
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
        check_tensor("weight", weight)
        check_same("weight", weight, "input", input)
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
        check_same("target", target, "input", input)
        if ignore_index != -100:
            raise ValueError(f"ignore_index ({ignore_index}) applies to class-index targets only, "
                             "not to a floating-point target of probabilities")
        return True

    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"target must hold class indices as int64 or uint8 (or probabilities of the input's "
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


# --------------------------------------------------------------------------- fake kernels

def cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    rows = input.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    return loss, input.new_empty((rows,), dtype=acc), input.new_empty((rows,), dtype=acc), input.new_empty((), dtype=acc)


def cross_entropy_backward_fake(grad_loss, input, target, weight, row_max, row_log_sum, total_weight, reduction,
                                ignore_index, label_smoothing):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, row_max, row_log_sum, total_weight,
                                        reduction, ignore_index, label_smoothing):
    return None


# --------------------------------------------------------------------------- autograd

def _row_scale(grad_loss: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype):
    """The factor of each row's loss gradient, broadcastable to (R, 1)."""
    g = grad_loss.to(dtype)
    if reduction == 0:
        return g.unsqueeze(1)
    return g / total_weight.to(dtype) if reduction == 1 else g


def _target_grad(grad_loss, input, weight, total_weight, reduction: int, label_smoothing: float):
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
    myext.cross_entropy). Forward keeps two numbers per row for backward, the row's
    max and log(sum(exp(x - max))), and the mean's divisor. With ``inplace_backward`` (cpp and cuda backends, contiguous
    logits) backward writes the gradient over the logits and bumps their version, so
    any other autograd node that saved them raises an error instead of reading it.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                reduction: int, ignore_index: int, label_smoothing: float, backend: str,
                inplace_backward: bool = False) -> torch.Tensor:
        loss, row_max, row_log_sum, total_weight = op("cross_entropy_forward", backend)(
            input, target, weight, reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(input, target, weight, row_max, row_log_sum, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)
        ctx.backend = backend
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        input, target, weight, row_max, row_log_sum, total_weight = ctx.saved_tensors
        reduction, ignore_index, label_smoothing = ctx.options
        grad_input = grad_target = None
        # The target's gradient reads the logits, so it comes before any in-place write.
        if ctx.needs_input_grad[1] and target.is_floating_point():
            grad_target = _target_grad(grad_loss, input, weight, total_weight, reduction, label_smoothing)
        if ctx.needs_input_grad[0]:
            args = (grad_loss, input, target, weight, row_max, row_log_sum, total_weight, reduction, ignore_index,
                    label_smoothing)
            if torch.is_grad_enabled():
                grad_input = CrossEntropyBackwardFunction.apply(*args, ctx.backend)
            elif ctx.inplace_backward:
                op("cross_entropy_backward_", ctx.backend)(*args)
                # The dispatcher does not bump versions for custom ops run in backward.
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:
                grad_input = op("cross_entropy_backward", ctx.backend)(*args)
        return grad_input, grad_target, None, None, None, None, None, None


class CrossEntropyBackwardFunction(torch.autograd.Function):
    """The backward of cross-entropy as a differentiable function, for double backward.

    Row i's gradient is s_i D_i with D_i = a_i p_i - (w q)_i, p_i = softmax(x_i),
    a_i = sum(w q_i) and s_i the upstream gradient (over the mean's divisor). The
    backward recomputes p from the input with torch ops so that it differentiates again.
    """

    @staticmethod
    def forward(ctx: Any, grad_loss, input, target, weight, row_max, row_log_sum, total_weight, reduction: int,
                ignore_index: int, label_smoothing: float, backend: str):
        ctx.save_for_backward(grad_loss, input, target, weight, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)
        return op("cross_entropy_backward", backend)(
            grad_loss, input, target, weight, row_max, row_log_sum, total_weight, reduction, ignore_index,
            label_smoothing)

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
            one_hot = F.one_hot(safe_target, classes).to(acc)
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
                None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------- the public function

def _as_rows(input: torch.Tensor, target: torch.Tensor, probabilities: bool):
    """(R, C) logits, (R,) or (R, C) targets, and the batch shape of the unreduced loss."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0), torch.Size([])
    if input.dim() == 2:
        return input, target, input.shape[:1]
    classes = input.size(1)
    rows = input.movedim(1, -1).reshape(-1, classes)
    target_rows = target.movedim(1, -1).reshape(-1, classes) if probabilities else target.reshape(-1)
    return rows, target_rows, input.shape[:1] + input.shape[2:]


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
        target: class indices (int64 or uint8) of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)``,
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
    if target.dtype == torch.uint8:
        target = target.long()  # the kernels read int64 class indices
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True would overwrite input, a leaf tensor that requires grad, with "
                         "its own gradient; use it for logits computed by an earlier op")
    name = resolve_backend(backend, input.device, NAME)
    if not probabilities and name != "cpp":
        check_class_indices(target, input.size(0) if input.dim() == 1 else input.size(1), ignore_index)
    if name == "torch":
        return reference(input, target, weight, ignore_index, reduction, label_smoothing)

    # The kernels see rows of classes: (R, C) logits and (R,) or (R, C) targets.
    input_2d, target_2d, batch_shape = _as_rows(input, target, probabilities)
    if not needs_grad(input_2d, target_2d):
        loss = op("cross_entropy_forward", name)(input_2d, target_2d, weight, REDUCTIONS[reduction], ignore_index,
                                                 float(label_smoothing))[0]
    else:
        inplace = (inplace_backward and input_2d.is_contiguous()
                   and has_capability(NAME, INPLACE_BACKWARD, name, input.device))
        loss = CrossEntropyFunction.apply(input_2d, target_2d, weight, REDUCTIONS[reduction], ignore_index,
                                          float(label_smoothing), name, inplace)
    return loss.reshape(batch_shape) if reduction == "none" else loss


# --------------------------------------------------------------------------- the spec

def cross_entropy_2d(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    As PyTorch defines it, with logp = log_softmax(input) and w the class weights
    (ones if none). Probabilities q, smoothed to (1 - eps) q + eps / C: loss_i =
    -sum_c w_c q_ic logp_ic, and 'mean' divides by R. Class indices t: loss_i =
    (1 - eps) nll_i + eps / C smooth_i with nll_i = -w_t logp_it and smooth_i =
    -sum_c w_c logp_ic, 0 for rows whose index is ignore_index (their gradient is 0,
    also for NaN or infinite logits, where PyTorch's is NaN); 'mean' divides each of
    the two sums by the summed weight w_t of the rows kept, so that a divisor of 0
    gives nan. The smoothing terms are left out for eps = 0 (where an infinite
    logit would make 0 * inf). half-precision input is computed in float32 and the
    loss cast back.
    """
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):
        input = input.float()
        target = target.float() if target.is_floating_point() else target
        weight = weight.float() if weight is not None else None
    rows, classes = input.shape
    kept = None
    if not target.is_floating_point():
        # Ignored rows take no part, also where their logits are NaN or infinite (PyTorch
        # computes their softmax anyway, and gives them a NaN gradient there).
        kept = target != ignore_index
        input = torch.where(kept.unsqueeze(1), input, torch.zeros_like(input))
    # log_softmax as PyTorch computes it: a +inf logit makes x - max, and the row, NaN.
    shifted = input - input.amax(dim=1, keepdim=True).detach()
    logp = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    w = weight if weight is not None else torch.ones(classes, dtype=input.dtype, device=input.device)
    eps = label_smoothing

    if target.is_floating_point():
        q = target * (1.0 - eps) + eps / classes if eps > 0 else target
        losses = -(logp * q * w).sum(dim=1)
        if reduction == "none":
            return losses.to(out_dtype)
        total = losses.sum()
        return (total if reduction == "sum" else total / rows).to(out_dtype)

    safe_target = torch.where(kept, target, torch.zeros_like(target))
    w_target = w[safe_target] * kept
    nll = torch.where(kept, -w_target * logp.gather(1, safe_target.unsqueeze(1)).squeeze(1), 0.0)
    smooth = torch.where(kept, -(logp * w).sum(dim=1), 0.0) if eps > 0 else None
    if reduction == "none":
        losses = (1.0 - eps) * nll + eps / classes * smooth if eps > 0 else nll
        return losses.to(out_dtype)
    divisor = w_target.sum() if reduction == "mean" else 1.0
    loss = nll.sum() / divisor
    if eps > 0:
        loss = (1.0 - eps) * loss + eps / classes * (smooth.sum() / divisor)
    return loss.to(out_dtype)


def reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """cross_entropy with F.cross_entropy's arguments, from elementary torch ops: the executable spec."""
    input_2d, target_2d, batch_shape = _as_rows(input, target, target.is_floating_point())
    loss = cross_entropy_2d(input_2d, target_2d, weight, ignore_index, reduction, float(label_smoothing))
    return loss.reshape(batch_shape) if reduction == "none" else loss


def _sample(shape: tuple[int, ...], device: str, *, kind: str = "class", weighted: bool = False,
            scale: float = 1.0, **options: Any) -> registry.Sample:
    """Logits of ``shape`` ((C), (N, C) or (N, C, d1, ...)) times ``scale``, and a target:
    class indices with the second ignored, or probabilities that require grad."""
    classes = shape[0] if len(shape) == 1 else shape[1]
    logits = (torch.randn(*shape, dtype=torch.float64, device=device) * scale).requires_grad_()
    if kind == "class":
        batch = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
        target = torch.randint(0, classes, batch, device=device)
        if target.numel() > 1:
            target.view(-1)[1] = options.get("ignore_index", -100)
    else:
        target = torch.softmax(torch.randn(*shape, dtype=torch.float64, device=device), dim=0 if len(shape) == 1 else 1)
        target.requires_grad_()
    if weighted:
        options["weight"] = torch.rand(classes, dtype=torch.float64, device=device).add(0.5)
    described = [f"{tuple(shape)} {kind}"] + (["weighted"] if weighted else [])
    described += [f"{k}={v}" for k, v in options.items() if k != "weight"]
    return registry.Sample((logits, target), options, name=", ".join(described))


def samples(device: str) -> list[registry.Sample]:
    """Each target kind with 1-d, 2-d and N-d logits, weights, smoothing and every
    reduction; transposed logits with strided weights; an ignore_index that is a class."""
    transposed = torch.randn(6, 4, dtype=torch.float64, device=device).t().requires_grad_()
    strided_weight = torch.rand(12, dtype=torch.float64, device=device)[::2] + 0.5
    probabilities = torch.softmax(torch.randn(6, 4, dtype=torch.float64, device=device), dim=0).t()
    return [
        _sample((5,), device),
        _sample((4, 5), device, weighted=True, label_smoothing=0.2, reduction="none"),
        _sample((2, 4, 3), device, weighted=True, reduction="sum"),
        _sample((6, 5), device, weighted=True, ignore_index=-1, label_smoothing=0.1),
        _sample((5,), device, kind="prob", label_smoothing=0.2, reduction="sum"),
        _sample((4, 5), device, kind="prob"),
        _sample((2, 4, 3), device, kind="prob", weighted=True, label_smoothing=0.2, reduction="none"),
        registry.Sample((transposed, torch.tensor([0, 5, -100, 2], device=device)),
                        dict(weight=strided_weight, label_smoothing=0.1), name="transposed (4, 6) class, strided weight"),
        registry.Sample((transposed, probabilities.requires_grad_()), dict(weight=strided_weight, reduction="sum"),
                        name="transposed (4, 6) prob, strided weight"),
        registry.Sample((torch.randn(4, 5, dtype=torch.float64, device=device).requires_grad_(),
                         torch.tensor([2, 0, 2, 4], device=device)), dict(ignore_index=2, label_smoothing=0.3),
                        name="(4, 5) class, ignore_index=2 a class"),
    ]


def accuracy_samples(device: str) -> list[registry.Sample]:
    """Logits of scale 3 in shapes over several blocks of the kernels (5000 classes) and N-d."""
    return [
        _sample((64, 100), device, weighted=True, scale=3.0, ignore_index=-1, label_smoothing=0.1),
        _sample((37, 70), device, kind="prob", weighted=True, scale=3.0, label_smoothing=0.1, reduction="none"),
        _sample((3, 5000), device, scale=3.0, reduction="sum"),
        _sample((2, 11, 3, 4), device, weighted=True, scale=3.0, reduction="none"),
    ]


def eager(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The PyTorch baseline of myext.cross_entropy (mean over the rows)."""
    return F.cross_entropy(input, target)


def benchmark_inputs(N: int, C: int, *, device: torch.device | str, dtype: torch.dtype,
                     requires_grad: bool) -> dict[str, torch.Tensor]:
    """Random logits and class-index targets."""
    return {
        "input": torch.randn(N, C, device=device, dtype=dtype).requires_grad_(requires_grad),
        "target": torch.randint(0, C, (N,), device=device),
    }


def work(shape, backward: bool, dtype: torch.dtype) -> tuple[float, str]:
    """The bytes an unfused implementation must move: forward reads the logits and targets;
    backward reads them again and writes the gradient."""
    logits = shape["N"] * shape["C"] * dtype.itemsize
    targets = shape["N"] * 8
    return (3 * logits + 2 * targets if backward else logits + targets), "GB/s"


SPEC = registry.register(registry.OpSpec(
    name=NAME,
    function=cross_entropy,
    reference=reference,
    baseline=F.cross_entropy,
    dispatcher_ops=("cross_entropy_forward", "cross_entropy_backward"),
    fakes={"cross_entropy_forward": cross_entropy_forward_fake,
           "cross_entropy_backward": cross_entropy_backward_fake,
           "cross_entropy_backward_": cross_entropy_backward_inplace_fake},
    capabilities={INPLACE_BACKWARD: "cross_entropy_backward_"},
    samples=samples,
    accuracy_samples=accuracy_samples,
    benchmark=registry.Benchmark(
        # N = 4096 rows, over the classes up to Llama-3's vocabulary (128256 classes are
        # 2.1 GB of float32 logits).
        sweep=[("N=4096", [dict(N=4096, C=c) for c in (10, 1000, 8192, 32000, 128256)])],
        quick_sweep=[("N=64", [dict(N=64, C=c) for c in (10, 100)])],
        cases=[dict(N=4096, C=c) for c in (10, 32000, 128256)],
        gpu_sweep=[("N=16384", [dict(N=16384, C=c) for c in (32000, 128256)])],
        x="C",
        inputs=benchmark_inputs,
        eager=eager,
        work=work,
        label=lambda shape: f"{shape['N']}x{shape['C']}",
    ),
))
