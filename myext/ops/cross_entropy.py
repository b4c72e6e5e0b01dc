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

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .. import registry
from .._library import acc_dtype
from .._batching import is_legacy_batched
from .._derivatives import jvp_of, vjp_of
from .._validation import REDUCTIONS, check_float_dtype, check_same, check_tensor, needs_grad, transforms_active
from ..backends import available_backends, has_capability, op, resolve_backend
from ..distributed import VocabParallel, all_reduce_max, all_reduce_sum, from_dtensor, is_dtensor, to_local

__all__ = ["CrossEntropyBackwardFunction", "CrossEntropyFunction", "CrossEntropyOutput", "Options", "cross_entropy",
           "cross_entropy_2d", "reference"]

NAME = "cross_entropy"
INPLACE_BACKWARD = "inplace_backward"
# The backward of a shard of the classes (myext.distributed's vocabulary parallelism).
SHARD_BACKWARD = "shard_backward"


# --------------------------------------------------------------------------- checks

def check_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> bool:
    """Checks the arguments of cross_entropy; returns True for probability targets."""
    check_tensor("input", input)
    check_tensor("target", target)
    check_float_dtype("input", input)
    shape = input.shape
    if len(shape) < 1:
        raise ValueError("input must be (C), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor")
    check_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    classes = shape[0] if len(shape) == 1 else shape[1]
    check_class_weight(weight, classes, input)
    # A tuple of indexed sizes: slicing and adding torch.Size objects costs a microsecond
    # on every call.
    class_shape = () if len(shape) == 1 else (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
    return check_target(target, input, ignore_index, class_shape=class_shape, prob_shape=input.shape,
                        prob_shape_name="the input's shape")


def check_options(ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float,
                  softcap: Optional[float]) -> None:
    """Checks the options of the cross-entropy ops (shared with linear_cross_entropy)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(lse_square_scale, (int, float)) or not 0.0 <= lse_square_scale < math.inf:
        raise ValueError(f"lse_square_scale must be a finite float >= 0, got {lse_square_scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be a finite float > 0, or None, got {softcap!r}")


def check_class_weight(weight: Optional[torch.Tensor], classes: int, input: torch.Tensor) -> None:
    """``weight``: None or one entry per class, on the input's device and of its dtype."""
    if weight is None:
        return
    check_tensor("weight", weight)
    check_same("weight", weight, "input", input)
    if weight.shape != (classes,):
        raise ValueError(f"weight must have one entry per class, shape ({classes},), got {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad, but myext does not differentiate the class weights; "
                         "pass weight.detach()")


def check_target(target: torch.Tensor, input: torch.Tensor, ignore_index: int, *, class_shape: tuple[int, ...],
                 prob_shape: tuple[int, ...], prob_shape_name: str) -> bool:
    """Checks a target of class indices (int64 or uint8, of ``class_shape``) or of
    probabilities (``prob_shape``, the input's dtype); returns True for probabilities."""
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}: "
                         "expected all tensors on one device")
    if target.is_floating_point():
        if target.shape != prob_shape:
            raise ValueError(f"a floating-point target holds class probabilities and must have "
                             f"{prob_shape_name} {tuple(prob_shape)}, got {tuple(target.shape)}")
        check_same("target", target, "input", input)
        if ignore_index != -100:
            raise ValueError(f"ignore_index ({ignore_index}) applies to class-index targets only, "
                             "not to a floating-point target of probabilities")
        return True
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"target must hold class indices as int64 or uint8 (or probabilities of the input's "
                        f"dtype), got {target.dtype}")
    if target.shape != class_shape:
        raise ValueError(f"target of class indices must have shape {tuple(class_shape)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def check_class_indices(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Raises IndexError for a class index outside [0, classes) that is not ignore_index.

    It reads the values (a host sync on a GPU), which a traced graph does not have,
    so it is skipped while compiling and under torch.func's transforms (whose batched
    tensors have no single value to read), and for the C++ kernels, which raise the same
    error as they read. In a compiled graph the CUDA and Triton kernels assert on
    such an index; neither reads out of bounds.
    """
    if torch.compiler.is_compiling() or target.numel() == 0 or transforms_active():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        value = target[bad].flatten()[0].item()
        raise IndexError(f"target holds class index {value}, expected values in [0, {classes}) "
                         f"or ignore_index ({ignore_index})")


# --------------------------------------------------------------------------- fake kernels

def cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale,
                               softcap):
    rows = input.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    row_max, row_log_sum, target_logit = (input.new_empty((rows,), dtype=acc) for _ in range(3))
    return loss, row_max, row_log_sum, target_logit, input.new_empty((), dtype=acc)


def cross_entropy_backward_fake(grad_loss, input, target, weight, row_max, row_log_sum, total_weight, reduction,
                                ignore_index, label_smoothing, lse_square_scale, softcap):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_shard_backward_fake(grad_loss, input, target, weight, row_max, row_log_sum, row_weight,
                                     total_weight, weight_sum, reduction, ignore_index, label_smoothing,
                                     lse_square_scale, softcap, class_start, classes):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, row_max, row_log_sum, total_weight,
                                        reduction, ignore_index, label_smoothing, lse_square_scale, softcap):
    return None


# --------------------------------------------------------------------------- autograd

@dataclasses.dataclass(frozen=True)
class Options:
    """The options of a call as the dispatcher ops take them (softcap 0: none), one
    value handed whole to the Functions, the references and the kernels' calls.

    A dataclass, not a tuple: torch.func's transforms flatten tuple arguments of an
    autograd Function into their fields, which they then cannot match with tangents.
    """

    reduction: int
    ignore_index: int
    label_smoothing: float
    lse_square_scale: float
    softcap: float

    @property
    def args(self) -> tuple:
        """The dispatcher ops' arguments, in their schemas' order."""
        return (self.reduction, self.ignore_index, self.label_smoothing, self.lse_square_scale, self.softcap)

    def reference(self, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """The reference loss of rows of logits with these options."""
        return cross_entropy_2d(input, target, weight, self.ignore_index, _REDUCTION_NAMES[self.reduction],
                                self.label_smoothing, self.lse_square_scale, self.softcap or None)


_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    ``CrossEntropyFunction.apply(input, target, weight, options, backend,
    inplace_backward)`` with ``options`` an :class:`Options`; the arguments already
    checked and reshaped to two dimensions (see myext.cross_entropy). Returns the loss
    and, not differentiable, each row's max and log(sum(exp(z - max))) of the capped
    logits z, the target's capped logit (for myext.cross_entropy's extras) and the
    mean's divisor; backward reads the two numbers per row and the divisor. With
    ``inplace_backward`` (cpp and cuda backends, contiguous logits) backward writes the
    gradient over the logits and bumps their version, so any other autograd node that
    saved them raises an error instead of reading it. torch.func's vmap runs it through
    the dispatcher ops' batching rules (generate_vmap_rule); forward-mode AD is
    :class:`CrossEntropyJvpFunction`'s.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], options: Options,
                backend: str, inplace_backward: bool):
        return op("cross_entropy_forward", backend)(input, target, weight, *options.args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, target, weight, ctx.options, ctx.backend, ctx.inplace_backward = inputs
        _, row_max, row_log_sum, target_logit, total_weight = output
        ctx.save_for_backward(input, target, weight, row_max, row_log_sum, total_weight)
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit, total_weight)
        # Backward gets None, not a tensor of zeros made on every call, for the extras.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused_grads):
        if grad_loss is None:  # the loss took no part in what is differentiated
            return (None,) * len(ctx.needs_input_grad)
        input, target, weight, row_max, row_log_sum, total_weight = ctx.saved_tensors
        grad_input = grad_target = None
        # The target's gradient reads the logits, so it comes before any in-place write.
        if ctx.needs_input_grad[1] and target.is_floating_point():
            grad_target = probability_target_grad(grad_loss, input, target, weight, ctx.options)
        if ctx.needs_input_grad[0]:
            args = (grad_loss, input, target, weight, row_max, row_log_sum, total_weight, *ctx.options.args)
            if torch.is_grad_enabled():
                function = CrossEntropyBackwardJvpFunction if transforms_active() else CrossEntropyBackwardFunction
                grad_input = function.apply(grad_loss, input, target, weight, row_max, row_log_sum, total_weight,
                                            ctx.options, ctx.backend)
            elif ctx.inplace_backward and not (transforms_active() or is_legacy_batched(grad_loss)):
                op("cross_entropy_backward_", ctx.backend)(*args)
                # The dispatcher does not bump versions for custom ops run in backward.
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:
                grad_input = op("cross_entropy_backward", ctx.backend)(*args)
        return grad_input, grad_target, None, None, None, None


class CrossEntropyJvpFunction(CrossEntropyFunction):
    """:class:`CrossEntropyFunction` with forward-mode AD, for calls under
    ``forward_ad`` or a torch.func transform (a Function of its own: dynamo cannot
    trace one that defines ``jvp``). The loss's tangent is each row's gradient, from
    the backward kernel and the row statistics of forward, dotted with the tangent of
    its logits (and of its probabilities), then reduced as the loss is."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        CrossEntropyFunction.setup_context(ctx, inputs, output)
        input, target, weight = inputs[:3]
        _, row_max, row_log_sum, _, total_weight = output
        ctx.save_for_forward(input, target, weight, row_max, row_log_sum, total_weight)

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[torch.Tensor], target_t: Optional[torch.Tensor],
            weight_t: Optional[torch.Tensor], *_constants):
        input, target, weight, row_max, row_log_sum, total_weight = ctx.saved_tensors
        refuse_class_weight_tangent(weight_t)
        rows = row_tangents(input, target, weight, row_max, row_log_sum, total_weight, ctx.options, ctx.backend,
                            input_t, target_t)
        return reduce_rows(rows, total_weight, ctx.options.reduction, input.dtype), None, None, None, None


def refuse_class_weight_tangent(weight_t: Optional[torch.Tensor]) -> None:
    """Class weights are not differentiated, in forward mode either: a tangent for them
    is refused as a weight that requires grad is, not dropped."""
    if weight_t is not None:
        raise ValueError("weight has a forward-mode tangent, but myext does not differentiate the class weights; "
                         "pass a weight without one")


def row_tangents(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], row_max: torch.Tensor,
                 row_log_sum: torch.Tensor, total_weight: torch.Tensor, options: Options, backend: str,
                 logits_t: Optional[torch.Tensor], target_t: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's loss tangent (R,), in the accumulation dtype: the row's gradient with
    respect to its logits (the backward kernel's, for an unreduced loss and an upstream
    gradient of 1) dotted with ``logits_t``, plus, for probabilities, the gradient with
    respect to them, -(1 - eps) w logp, dotted with ``target_t``."""
    acc = row_max.dtype
    per_row = dataclasses.replace(options, reduction=REDUCTIONS["none"])
    ones = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    tangent = torch.zeros(logits.shape[0], dtype=acc, device=logits.device)
    if logits_t is not None:
        grad = op("cross_entropy_backward", backend)(ones, logits, target, weight, row_max, row_log_sum, total_weight,
                                                     *per_row.args)
        tangent = tangent + (grad.to(acc) * logits_t.to(acc)).sum(dim=1)
    if target_t is not None:
        logp = _capped(logits.to(acc), options.softcap or None) - (row_max + row_log_sum).unsqueeze(1)
        tangent = tangent + (target_grad_of(ones, logp, weight, per_row) * target_t.to(acc)).sum(dim=1)
    return tangent


def probability_target_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                            weight: Optional[torch.Tensor], options: Options) -> torch.Tensor:
    """The gradient for probability targets q of logits (R, C): -(1 - eps) w_c logp_ic
    times row i's upstream gradient (divided by R for 'mean'), logp the log-softmax of
    the capped logits. From torch ops, without autograd.grad, so that torch.compile
    traces it and autograd differentiates it again."""
    logits = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    logp = torch.log_softmax(_capped(logits, options.softcap or None), dim=1)
    return target_grad_of(grad_loss, logp, weight, options).to(target.dtype)


def target_grad_of(grad_loss: torch.Tensor, logp: torch.Tensor, weight: Optional[torch.Tensor],
                   options: Options) -> torch.Tensor:
    """-(1 - eps) w_c logp_ic times row i's upstream gradient (divided by R for 'mean'):
    the gradient for probability targets, given the log-softmax ``logp`` (R, C)."""
    scale = grad_loss.to(logp.dtype)
    if options.reduction == REDUCTIONS["none"]:
        scale = scale.unsqueeze(1)
    elif options.reduction == REDUCTIONS["mean"]:
        scale = scale / logp.shape[0]
    grad = logp * (-(1.0 - options.label_smoothing) * scale)
    return grad * weight.to(logp.dtype) if weight is not None else grad


class CrossEntropyBackwardFunction(torch.autograd.Function):
    """The backward of cross-entropy as a differentiable function, for double backward.

    Forward runs the backend's backward kernel; its backward differentiates the
    reference's gradient (torch ops) again, which makes double and higher backward
    exact for every option.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, input, target, weight, row_max, row_log_sum, total_weight, options: Options,
                backend: str):
        return op("cross_entropy_backward", backend)(grad_loss, input, target, weight, row_max, row_log_sum,
                                                      total_weight, *options.args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        grad_loss, input, target, weight = inputs[:4]
        ctx.options = inputs[7]
        ctx.save_for_backward(grad_loss, input, target, weight)

    @staticmethod
    def backward(ctx: Any, grad_grad_input):
        grad_loss, input, target, weight = ctx.saved_tensors
        wanted = (*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and target.is_floating_point())
        grads = vjp_of(lambda g, x, t: reference_input_grad(g, x, t, weight, ctx.options), (grad_loss, input, target),
                       grad_grad_input, wanted)
        return (*grads, None, None, None, None, None, None)


class CrossEntropyBackwardJvpFunction(CrossEntropyBackwardFunction):
    """:class:`CrossEntropyBackwardFunction` with forward-mode AD, for
    forward-over-reverse (torch.func.hessian): the tangent of the reference's gradient
    (myext._derivatives.jvp_of), exact for every option as its backward is."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        CrossEntropyBackwardFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def jvp(ctx: Any, grad_loss_t, input_t, target_t, _weight_t, *_constants):
        # The class weights' tangent is not read: torch.func hands saved tensors one
        # of zeros here, and a real one was refused by CrossEntropyJvpFunction already.
        grad_loss, input, target, weight = ctx.saved_tensors
        return jvp_of(lambda g, x, t: reference_input_grad(g, x, t, weight, ctx.options), (grad_loss, input, target),
                      (grad_loss_t, input_t, target_t if target.is_floating_point() else None))


def reference_input_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                         weight: Optional[torch.Tensor], options: Options) -> torch.Tensor:
    """The reference's gradient with respect to ``input`` for the upstream gradient
    ``grad_loss``, as a graph that differentiates again."""
    return vjp_of(lambda x: options.reference(x, target, weight), (input,), grad_loss, (True,))[0]


# --------------------------------------------------------------------------- vocabulary parallelism

class ShardRows(NamedTuple):
    """Each row's statistics over the whole classes, combined from every rank's shard:
    what the loss and the shard's backward need (all in the accumulation dtype)."""

    loss: torch.Tensor          # (R,) each row's loss, 0 where ignored
    row_max: torch.Tensor       # (R,) the max over every class's (capped) logit
    row_log_sum: torch.Tensor   # (R,) log(sum(exp(z - row_max))) over every class
    target_logit: torch.Tensor  # (R,) the target's capped logit (0 for probabilities)
    row_weight: torch.Tensor    # (R,) sum(w q) over every class
    total_weight: torch.Tensor  # () the mean's divisor
    weight_sum: torch.Tensor    # () the sum of every class's weight


class ShardForward(NamedTuple):
    """How one rank's forward kernel runs over its columns (the shard's logits, or the
    linear layer's rows that make them) to give its rows' statistics: with ``target``
    and the options ``settings`` instead of the call's."""

    target: torch.Tensor                   # the kernel's target
    settings: tuple                        # (reduction, ignore_index, label_smoothing, lse_square_scale, softcap)
    holds: Optional[torch.Tensor]          # class indices: the rows whose target is in the shard
    held_weight: torch.Tensor              # (R,) see shard_statistics
    weight_sum: torch.Tensor               # () the shard's summed class weight


def shard_forward(target: torch.Tensor, weight: Optional[torch.Tensor], columns: int, options: Options,
                  shard: VocabParallel, dtype: torch.dtype) -> ShardForward:
    """The shard's forward kernel call, for ``columns`` classes of logits of ``dtype``.

    The kernel's loss, with reduction none, is then each row's gap sum(v (lse_r - z))
    over the shard, lse_r the shard's own log-sum-exp: class indices get label
    smoothing 1 (whose loss is eps / C_local sum(w (lse_r - z))), probabilities the
    smoothed target w q without further smoothing. Every term of the gap is >= 0, so
    that no sum of large terms cancels.
    """
    acc = acc_dtype(dtype)
    eps = options.label_smoothing
    weight_sum = (weight.to(acc).sum() if weight is not None
                  else torch.tensor(float(columns), dtype=acc, device=target.device))
    if target.is_floating_point():
        q = target * (1.0 - eps) + eps / shard.classes if eps > 0 else target
        held_weight = (q * weight if weight is not None else q).to(acc).sum(dim=1)
        return ShardForward(q, (0, options.ignore_index, 0.0, 0.0, options.softcap), None, held_weight, weight_sum)
    kept = target != options.ignore_index
    local = target - shard.start
    holds = kept & (local >= 0) & (local < columns)
    # Rows whose target is elsewhere still need their statistics: class 0 stands in
    # (smoothing 1 gives it no weight); ignored rows are -1, which the kernel skips.
    kernel_target = torch.where(holds, local, torch.where(kept, 0, -1))
    if weight is None or columns == 0:
        held_weight = holds.to(acc)
    else:
        held_weight = torch.where(holds, weight.to(acc)[local.clamp(0, columns - 1)], 0.0)
    return ShardForward(kernel_target, (0, -1, 1.0 if eps > 0 else 0.0, 0.0, options.softcap), holds, held_weight,
                        weight_sum)


def shard_statistics(plan: ShardForward, kernel_out: Optional[tuple[torch.Tensor, ...]], rows: int,
                     columns: int) -> tuple[torch.Tensor, ...]:
    """One rank's part of :class:`ShardRows` from its forward kernel's (loss, row_max,
    row_log_sum, target_logit) as ``plan`` ran it (None for a shard of no columns).

    Returns (max, log_sum, gap, target_logit, held_weight, weight_sum): per row the
    max and log-sum of the shard's capped logits, the gap (see :func:`shard_forward`;
    v = w for class indices, w q for probabilities), the target's logit and weight where
    the shard holds the target (else 0; sum(w q) over the shard for probabilities), and
    the shard's summed class weight.
    """
    acc = plan.held_weight.dtype
    if kernel_out is None:
        # No logits here: an empty sum of exponentials, whose log is -inf.
        empty = torch.zeros(rows, dtype=acc, device=plan.held_weight.device)
        return (torch.full_like(empty, -math.inf), empty, empty, empty, plan.held_weight, plan.weight_sum)
    loss, row_max, row_log_sum, target_logit = kernel_out
    if plan.holds is None:
        return row_max, row_log_sum, loss.to(acc), target_logit, plan.held_weight, plan.weight_sum
    return (row_max, row_log_sum, loss.to(acc) * columns, torch.where(plan.holds, target_logit, 0.0),
            plan.held_weight, plan.weight_sum)


def shard_logit_statistics(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                           options: Options, shard: VocabParallel, backend: str) -> tuple[torch.Tensor, ...]:
    """:func:`shard_statistics` of a shard's logits (R, C_local), from the backend's
    cross-entropy forward kernel (for ``"torch"``, torch ops)."""
    rows, columns = input.shape
    plan = shard_forward(target, weight, columns, options, shard, input.dtype)
    kernel_out = None
    if columns and backend == "torch":
        kernel_options = Options(*plan.settings)
        kernel_out = (kernel_options.reference(input, plan.target, weight),
                      *_reference_rows(input, plan.target, kernel_options))
    elif columns:
        kernel_out = op("cross_entropy_forward", backend)(input, plan.target, weight, *plan.settings)[:4]
    return shard_statistics(plan, kernel_out, rows, columns)


def combine_shards(statistics: tuple[torch.Tensor, ...], target: torch.Tensor, options: Options,
                   shard: VocabParallel) -> ShardRows:
    """Every rank's :func:`shard_statistics` combined into :class:`ShardRows`: an
    all_reduce (max) of one number per row, then one (sum) of four, and the loss of
    each row over every class from them."""
    row_max, row_log_sum, gap, target_logit, held_weight, weight_sum = statistics
    global_max = all_reduce_max(row_max, shard.group)
    # Rows whose every logit is -inf: a shift of 0 keeps exp(-inf - shift) = 0.
    shift = torch.where(global_max == -math.inf, 0.0, global_max)
    lse_r = row_max + row_log_sum
    eps, classes = options.label_smoothing, shard.classes
    probabilities = target.is_floating_point()
    # sum(v (lse_r - z)) + sum(v) (shift - lse_r) is this shard's sum(v (shift - z)),
    # every other term of the loss being a whole row's. A shard without a finite logit
    # in the row (or without columns) has its gap already (inf, or 0 for no columns).
    offset = torch.where(lse_r == -math.inf, 0.0, shift - lse_r)
    shard_gap = gap + (held_weight if probabilities else weight_sum) * offset
    rowwise = torch.stack([torch.exp(lse_r - shift), shard_gap, target_logit, held_weight])
    summed = all_reduce_sum(torch.cat([rowwise.flatten(), weight_sum.reshape(1)]), shard.group)
    sum_exp, total_gap, target_logit, held_weight = summed[:-1].view(4, -1)
    total_class_weight = summed[-1]
    log_sum = torch.log(sum_exp)
    lse = shift + log_sum
    z_loss = options.lse_square_scale * lse * lse if options.lse_square_scale else 0.0
    if probabilities:
        # sum(w q (lse - z)) = sum(w q (shift - z)) + sum(w q) log_sum.
        loss = total_gap + held_weight * log_sum + z_loss
        row_weight = held_weight
        total_weight = torch.tensor(float(target.shape[0]), dtype=loss.dtype, device=loss.device)
    else:
        kept = target != options.ignore_index
        loss = (1.0 - eps) * held_weight * ((shift - target_logit) + log_sum) + z_loss
        if eps > 0:
            loss = loss + eps / classes * (total_gap + total_class_weight * log_sum)
        loss = torch.where(kept, loss, 0.0)
        row_weight = (1.0 - eps) * held_weight + eps / classes * total_class_weight
        total_weight = torch.where(kept, held_weight, 0.0).sum()
    return ShardRows(loss, shift, log_sum, target_logit, row_weight, total_weight, total_class_weight)


def reduce_rows(losses: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype) -> torch.Tensor:
    """The op's loss, in ``dtype``, from each row's: the rows summed in float64, as the
    kernels sum them; a mean over no weight is nan."""
    if reduction == REDUCTIONS["none"]:
        return losses.to(dtype)
    total = losses.double().sum()
    if reduction == REDUCTIONS["mean"]:
        total = total / total_weight.double()
    return total.to(dtype)


def shard_target_grad(grad_loss: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                      rows: ShardRows, options: Options) -> torch.Tensor:
    """The gradient for a shard's probability targets: -(1 - eps) w_c (z_c - lse) times
    the row's upstream gradient (divided by R for 'mean')."""
    z = _capped(input.to(rows.row_max.dtype), options.softcap or None)
    logp = z - (rows.row_max + rows.row_log_sum).unsqueeze(1)
    return target_grad_of(grad_loss, logp, weight, options).to(input.dtype)


def shard_input_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                     weight: Optional[torch.Tensor], rows: ShardRows, options: Options, shard: VocabParallel,
                     backend: str) -> torch.Tensor:
    """The gradient of the loss over every class w.r.t. a shard's logits."""
    if input.shape[1] == 0:
        return torch.zeros_like(input)
    return op("cross_entropy_shard_backward", backend)(
        grad_loss, input, target, weight, rows.row_max, rows.row_log_sum, rows.row_weight, rows.total_weight,
        rows.weight_sum, *options.args, shard.start, shard.classes)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy over every class of logits split by classes across ranks.

    ``apply(input, target, weight, options, shard, backend)``: this rank's logits
    ``(R, C_local)`` of classes ``[shard.start, shard.stop)``, class indices ``(R,)``
    into every class or the shard's probabilities ``(R, C_local)``, the shard's class
    weights. Returns the loss (the same on every rank) and, not differentiable, each
    row's max and log-sum over every class and the target's logit. Backward needs no
    collective: it computes this shard's gradient from the saved per-row numbers.
    Differentiable once.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                options: Options, shard: VocabParallel, backend: str):
        rows = combine_shards(shard_logit_statistics(input, target, weight, options, shard, backend), target, options,
                              shard)
        ctx.save_for_backward(input, target, weight, *rows)
        ctx.options, ctx.shard, ctx.backend = options, shard, backend
        ctx.mark_non_differentiable(rows.row_max, rows.row_log_sum, rows.target_logit)
        ctx.set_materialize_grads(False)  # as CrossEntropyFunction's
        loss = reduce_rows(rows.loss, rows.total_weight, options.reduction, input.dtype)
        return loss, rows.row_max, rows.row_log_sum, rows.target_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused_grads):
        if grad_loss is None:  # the loss took no part in what is differentiated
            return (None,) * len(ctx.needs_input_grad)
        input, target, weight, *saved = ctx.saved_tensors
        rows = ShardRows(*saved)
        grad_input = grad_target = None
        if ctx.needs_input_grad[1]:
            grad_target = shard_target_grad(grad_loss, input, weight, rows, ctx.options)
        if ctx.needs_input_grad[0]:
            grad_input = shard_input_grad(grad_loss, input, target, weight, rows, ctx.options, ctx.shard,
                                          ctx.backend)
        return grad_input, grad_target, None, None, None, None


def vocab_parallel_reference(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                             options: Options, shard: VocabParallel) -> torch.Tensor:
    """The loss over every class of a shard's logits (R, C_local), from torch ops and
    differentiable all_reduce sums: the executable spec of the vocabulary-parallel mode,
    and its ``"torch"`` backend. Its terms as :func:`cross_entropy_2d` defines them,
    each sum over the classes split into a sum over this shard's, which depends on its
    logits alone (see myext.distributed.all_reduce_sum), times a whole row's number."""
    out_dtype = input.dtype
    acc = acc_dtype(input.dtype)
    input, target = input.to(acc), (target.to(acc) if target.is_floating_point() else target)
    weight = weight.to(acc) if weight is not None else None
    rows, columns = input.shape
    group, eps, classes = shard.group, options.label_smoothing, shard.classes
    kept = None if target.is_floating_point() else target != options.ignore_index
    if kept is not None:
        input = torch.where(kept.unsqueeze(1), input, torch.zeros_like(input))
    z = _capped(input, options.softcap or None)
    local_max = z.amax(dim=1) if columns else z.new_full((rows,), -math.inf)
    row_max = all_reduce_max(local_max, group)
    lse = row_max + torch.log(all_reduce_sum((z - row_max.unsqueeze(1)).exp().sum(dim=1), group))
    w = weight if weight is not None else torch.ones(columns, dtype=acc, device=input.device)
    z_loss = options.lse_square_scale * lse * lse if options.lse_square_scale else 0.0
    if kept is None:
        q = target * (1.0 - eps) + eps / classes if eps > 0 else target
        wq = all_reduce_sum((w * q).sum(dim=1), group)
        losses = wq * lse - all_reduce_sum((w * q * z).sum(dim=1), group) + z_loss
        divisor = torch.tensor(float(rows), dtype=acc, device=input.device)
    else:
        local = target - shard.start
        holds = kept & (local >= 0) & (local < columns)
        safe = local.clamp(0, max(columns - 1, 0)).unsqueeze(1)
        z_target = all_reduce_sum(torch.where(holds, z.gather(1, safe).squeeze(1) if columns else 0.0, 0.0), group)
        w_target = all_reduce_sum(torch.where(holds, w[safe.squeeze(1)] if columns else 0.0, 0.0), group)
        losses = (1.0 - eps) * w_target * (lse - z_target) + z_loss
        if eps > 0:
            smooth = all_reduce_sum(w.sum(), group) * lse - all_reduce_sum((w * z).sum(dim=1), group)
            losses = losses + eps / classes * smooth
        losses = torch.where(kept, losses, 0.0)
        divisor = torch.where(kept, w_target, 0.0).sum()
    if options.reduction == REDUCTIONS["none"]:
        return losses.to(out_dtype)
    total = losses.sum()
    return (total / divisor if options.reduction == REDUCTIONS["mean"] else total).to(out_dtype)


# --------------------------------------------------------------------------- the public function

class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` returns when asked for its extras.

    Attributes:
        loss: the loss, as without extras.
        lse: with ``return_lse``, the log-sum-exp of each element's (capped) logits, of
            the shape of an unreduced loss; NaN where the target is ignore_index (those
            logits are not read). Else None.
        accuracy: with ``return_accuracy``, the fraction of the elements not ignored
            whose target's logit is the largest of its row (ties count as right); NaN
            where all are ignored. Else None.
    """

    loss: torch.Tensor
    lse: Optional[torch.Tensor]
    accuracy: Optional[torch.Tensor]


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


def extras(row_max: torch.Tensor, row_log_sum: torch.Tensor, target_logit: torch.Tensor, target: torch.Tensor,
           ignore_index: int, batch_shape: torch.Size, return_lse: bool, return_accuracy: bool):
    """(lse, accuracy) from the kernels' per-row outputs (each None where not asked for).
    Shared with the fused linear cross-entropy, whose kernels give the same outputs."""
    lse = accuracy = None
    probabilities = target.is_floating_point()
    kept = None if probabilities else target != ignore_index
    if return_lse:
        lse = (row_max + row_log_sum).detach()
        if kept is not None:
            lse = torch.where(kept, lse, torch.full_like(lse, math.nan))
        lse = lse.reshape(batch_shape)
    if return_accuracy:
        hits = ((target_logit >= row_max) & kept).to(row_max.dtype)
        accuracy = hits.sum() / kept.sum()
    return lse, accuracy


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
    vocab_parallel: Optional[VocabParallel] = None,
) -> Union[torch.Tensor, CrossEntropyOutput]:
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
        lse_square_scale: the z-loss of PaLM: adds ``lse_square_scale * lse**2`` to the
            loss of each element not ignored, before the reduction (so ``"mean"`` divides
            it by the same divisor), ``lse`` the log-sum-exp of its logits.
        softcap: caps the logits at ``softcap * tanh(input / softcap)`` before the
            softmax (Gemma 2's logit soft-capping); ``None`` (default) leaves them.
        return_lse: also return each element's log-sum-exp (of the capped logits), for
            logging: computed in the same pass, no gradient flows through it.
        return_accuracy: also return the token accuracy (class-index targets), computed
            in the same pass, no gradient.
        backend: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``; ``None`` picks
            ``$MYEXT_BACKEND`` or the best backend available for the tensors' device.
        inplace_backward: write the gradient over the logits' own buffer in backward,
            saving a second ``N x C`` allocation (as flash-attention's cross-entropy
            offers). Only for logits computed by an earlier op, never a leaf tensor;
            after backward they hold their gradient. Should anything else have saved
            the logits for its backward, autograd raises an error rather than let it
            read the gradient. Backends without an in-place kernel (``torch``,
            ``triton``) and non-contiguous logits compute out of place.
        vocab_parallel: the classes are split across the ranks of a process group
            (:class:`myext.distributed.VocabParallel`): ``input`` holds this rank's
            classes ``[start, stop)`` in its class dimension, ``target`` class indices
            into all ``C`` classes (the same on every rank) or this rank's columns of
            the probabilities, ``weight`` this rank's ``(stop - start)`` class weights
            or all ``C``. The loss, lse and accuracy are those over every class, the
            same on every rank, and backward gives this rank's slice of the logits'
            gradient; no logits are gathered. Needs the same call on every rank of the
            group; not with ``inplace_backward``. A DTensor ``input`` whose class
            dimension is ``Shard`` on a 1-d mesh needs no ``vocab_parallel``: the split
            is the DTensor's (its target and weight plain tensors or DTensors on that
            mesh); the loss is a plain tensor.

    Returns:
        The loss: a scalar, or for ``reduction="none"`` the loss of each element of the
        target's batch shape. bfloat16 and float16 inputs are computed in float32 and
        the loss returned in the input's dtype. With ``return_lse`` or
        ``return_accuracy``, a :class:`CrossEntropyOutput` ``(loss, lse, accuracy)``.

    Example::

        >>> logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> torch.allclose(myext.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
        True
        >>> loss, lse, accuracy = myext.cross_entropy(logits, labels, lse_square_scale=1e-4,
        ...                                           return_lse=True, return_accuracy=True)
    """
    if is_dtensor(input):
        mesh = input.device_mesh
        input, vocab_parallel = from_dtensor(input, 0 if input.dim() == 1 else 1)
        target, weight = to_local(target, mesh, "target"), to_local(weight, mesh, "weight")
    if vocab_parallel is not None:
        weight = shard_weight(weight, vocab_parallel)
    probabilities = check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                        lse_square_scale, softcap)
    if return_accuracy and probabilities:
        raise ValueError("return_accuracy needs class-index targets, not probabilities")
    if target.dtype == torch.uint8:
        target = target.long()  # the kernels read int64 class indices
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True would overwrite input, a leaf tensor that requires grad, with "
                         "its own gradient; use it for logits computed by an earlier op")
    name = resolve_backend(backend, input.device, NAME)
    if vocab_parallel is not None:
        if inplace_backward:
            raise ValueError("inplace_backward is not available with vocab_parallel")
        check_vocab_parallel(vocab_parallel, input.size(0 if input.dim() == 1 else 1), "input's class dimension",
                             input.device, name)
    if not probabilities and (name != "cpp" or vocab_parallel is not None):
        classes = vocab_parallel.classes if vocab_parallel is not None else input.size(0 if input.dim() == 1 else 1)
        check_class_indices(target, classes, ignore_index)

    # The kernels see rows of classes: (R, C) logits and (R,) or (R, C) targets.
    input_2d, target_2d, batch_shape = _as_rows(input, target, probabilities)
    options = Options(REDUCTIONS[reduction], ignore_index, float(label_smoothing), float(lse_square_scale),
                      float(softcap or 0.0))
    if vocab_parallel is not None and name == "torch":
        loss = vocab_parallel_reference(input_2d, target_2d, weight, options, vocab_parallel)
        if return_lse or return_accuracy:
            with torch.no_grad():
                statistics = shard_logit_statistics(input_2d, target_2d, weight, options, vocab_parallel, name)
                rows = combine_shards(statistics, target_2d, options, vocab_parallel)
            row_max, row_log_sum, target_logit = rows.row_max, rows.row_log_sum, rows.target_logit
    elif vocab_parallel is not None:
        loss, row_max, row_log_sum, target_logit = VocabParallelCrossEntropyFunction.apply(
            input_2d, target_2d, weight, options, vocab_parallel, name)
    elif name == "torch":
        loss = options.reference(input_2d, target_2d, weight)
        row_max, row_log_sum, target_logit = _reference_rows(input_2d, target_2d, options)
    elif not needs_grad(input_2d, target_2d):
        loss, row_max, row_log_sum, target_logit, _ = op("cross_entropy_forward", name)(
            input_2d, target_2d, weight, *options.args)
    else:
        inplace = (inplace_backward and input_2d.is_contiguous()
                   and has_capability(NAME, INPLACE_BACKWARD, name, input.device))
        function = CrossEntropyJvpFunction if transforms_active() else CrossEntropyFunction
        loss, row_max, row_log_sum, target_logit, _ = function.apply(input_2d, target_2d, weight, options, name,
                                                                     inplace)
    loss = loss.reshape(batch_shape) if reduction == "none" else loss
    if not (return_lse or return_accuracy):
        return loss
    return CrossEntropyOutput(loss, *extras(row_max, row_log_sum, target_logit, target_2d, ignore_index,
                                            batch_shape, return_lse, return_accuracy))


def shard_weight(weight: Optional[torch.Tensor], shard: VocabParallel) -> Optional[torch.Tensor]:
    """The shard's class weights from ``weight``: the shard's own ``(stop - start)`` or
    every class's ``(C)``."""
    if weight is not None and weight.dim() == 1 and weight.shape[0] == shard.classes != shard.size:
        return weight[shard.start:shard.stop]
    return weight


def check_vocab_parallel(shard: VocabParallel, columns: int, what: str, device: torch.device, backend: str,
                         op_name: str = NAME) -> None:
    """``shard`` describes ``columns`` classes (those of ``what``), and ``backend`` has
    the shard kernels of the op ``op_name`` (its ``shard_backward`` capability) on
    ``device``; refuses forward-mode AD and torch.func's transforms, which the
    collectives between the ranks do not support (PyTorch's own differentiable
    all_reduce has no forward-mode formula, and a batch would need one call per rank
    and element)."""
    if not isinstance(shard, VocabParallel):
        raise TypeError(f"vocab_parallel must be a myext.distributed.VocabParallel, got {type(shard).__name__}")
    if transforms_active():
        raise NotImplementedError(f"{op_name} with vocab_parallel supports reverse-mode autograd only: not "
                                  "forward-mode AD (torch.autograd.forward_ad) or torch.func's transforms")
    if columns != shard.size:
        raise ValueError(f"vocab_parallel holds classes [{shard.start}, {shard.stop}), {shard.size} of them, but "
                         f"{what} has {columns}")
    if backend != "torch" and not has_capability(op_name, SHARD_BACKWARD, backend, device):
        shard_backends = [b for b in available_backends(device, op_name)
                          if b == "torch" or has_capability(op_name, SHARD_BACKWARD, b, device)]
        raise ValueError(f"backend {backend!r} has no vocabulary-parallel kernels for {op_name} on {device.type}; "
                         f"backends that have: {shard_backends}")


# --------------------------------------------------------------------------- the spec

def _capped(input: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """softcap * tanh(input / softcap), from exp and expm1 so that both it and the
    derivative autograd takes from it, 1 / cosh^2 = 4 e / (1 + e)^2 with e = exp(-2 |u|),
    are precise; torch.tanh's derivative, 1 - tanh^2, cancels to nothing where tanh is
    within rounding of 1. The kernels compute the same."""
    if not softcap:
        return input
    u = input / softcap

    def tanh_of_nonnegative(v):
        # Near 0, -m / (2 + m) with m = expm1(-2v) (1 - e would cancel); further out
        # (1 - e) / (1 + e), whose derivative, unlike expm1's (m + 1), keeps its digits.
        m = torch.expm1(-2 * v)
        e = torch.exp(-2 * v)
        return torch.where(v < 0.5, -m / (2 + m), (1 - e) / (1 + e))

    # tanh is odd: one evaluation at |u| (never at -|u|, where exp overflows and its
    # derivative, though where() discards it, turns the gradient to NaN), with the sign
    # chosen so that the derivative at 0 is 1 (abs's would be 0).
    nonnegative = torch.where(u >= 0, u, -u)
    magnitude = tanh_of_nonnegative(nonnegative)
    return softcap * torch.where(u >= 0, magnitude, -magnitude)


def _reference_rows(input: torch.Tensor, target: torch.Tensor, options: Options):
    """Each row's max and log-sum and the target's logit, as the kernels give them, from
    torch ops (the torch backend's extras)."""
    with torch.no_grad():
        z = _capped(input.float() if input.dtype in (torch.float16, torch.bfloat16) else input, options.softcap)
        row_max = z.amax(dim=1)
        row_log_sum = (z - row_max.unsqueeze(1)).exp().sum(dim=1).log()
        if target.is_floating_point():
            target_logit = torch.zeros_like(row_max)
        else:
            safe = torch.where(target == options.ignore_index, torch.zeros_like(target), target)
            target_logit = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    return row_max, row_log_sum, target_logit


def cross_entropy_2d(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    As PyTorch defines it, with logp = log_softmax(z), z the logits capped at
    softcap * tanh(input / softcap) where softcap is given, and w the class weights
    (ones if none). Probabilities q, smoothed to (1 - eps) q + eps / C: loss_i =
    -sum_c w_c q_ic logp_ic, and 'mean' divides by R. Class indices t: loss_i =
    (1 - eps) nll_i + eps / C smooth_i with nll_i = -w_t logp_it and smooth_i =
    -sum_c w_c logp_ic, 0 for rows whose index is ignore_index (their gradient is 0,
    also for NaN or infinite logits, where PyTorch's is NaN); 'mean' divides each of
    the two sums by the summed weight w_t of the rows kept, so that a divisor of 0
    gives nan. The smoothing terms are left out for eps = 0 (where an infinite
    logit would make 0 * inf). The z-loss adds lse_square_scale * lse_i^2 to the loss
    of each row kept, divided by the same divisor for 'mean'. half-precision input
    is computed in float32 and the loss cast back.
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
    z = _capped(input, softcap)
    # log_softmax as PyTorch computes it: a +inf logit makes z - max, and the row, NaN.
    shifted = z - z.amax(dim=1, keepdim=True).detach()
    log_sum = shifted.exp().sum(dim=1, keepdim=True).log()
    logp = shifted - log_sum
    w = weight if weight is not None else torch.ones(classes, dtype=input.dtype, device=input.device)
    eps = label_smoothing
    z_loss = None
    if lse_square_scale:
        lse = (z.amax(dim=1).detach() + log_sum.squeeze(1))
        z_loss = lse_square_scale * lse * lse

    if target.is_floating_point():
        q = target * (1.0 - eps) + eps / classes if eps > 0 else target
        losses = -(logp * q * w).sum(dim=1)
        if z_loss is not None:
            losses = losses + z_loss
        if reduction == "none":
            return losses.to(out_dtype)
        total = losses.sum()
        return (total if reduction == "sum" else total / rows).to(out_dtype)

    safe_target = torch.where(kept, target, torch.zeros_like(target))
    w_target = w[safe_target] * kept
    nll = torch.where(kept, -w_target * logp.gather(1, safe_target.unsqueeze(1)).squeeze(1), 0.0)
    smooth = torch.where(kept, -(logp * w).sum(dim=1), 0.0) if eps > 0 else None
    z_loss = torch.where(kept, z_loss, 0.0) if z_loss is not None else None
    if reduction == "none":
        losses = (1.0 - eps) * nll + eps / classes * smooth if eps > 0 else nll
        return (losses + z_loss if z_loss is not None else losses).to(out_dtype)
    divisor = w_target.sum() if reduction == "mean" else 1.0
    loss = nll.sum() / divisor
    if eps > 0:
        loss = (1.0 - eps) * loss + eps / classes * (smooth.sum() / divisor)
    if z_loss is not None:
        loss = loss + z_loss.sum() / divisor
    return loss.to(out_dtype)


def reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """cross_entropy's loss with its arguments, from elementary torch ops: the executable spec."""
    input_2d, target_2d, batch_shape = _as_rows(input, target, target.is_floating_point())
    loss = cross_entropy_2d(input_2d, target_2d, weight, ignore_index, reduction, float(label_smoothing),
                            lse_square_scale, softcap)
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
        _sample((4, 5), device, weighted=True, scale=4.0, label_smoothing=0.1, lse_square_scale=0.1, softcap=3.0),
        _sample((2, 4, 3), device, kind="prob", scale=4.0, lse_square_scale=0.2, softcap=2.0, reduction="none"),
        _sample((6, 5), device, lse_square_scale=0.05, reduction="sum"),
    ]


def accuracy_samples(device: str) -> list[registry.Sample]:
    """Logits of scale 3 in shapes over several blocks of the kernels (5000 classes) and N-d."""
    return [
        _sample((64, 100), device, weighted=True, scale=3.0, ignore_index=-1, label_smoothing=0.1),
        _sample((37, 70), device, kind="prob", weighted=True, scale=3.0, label_smoothing=0.1, reduction="none"),
        _sample((3, 5000), device, scale=3.0, reduction="sum"),
        _sample((2, 11, 3, 4), device, weighted=True, scale=3.0, reduction="none"),
        _sample((37, 700), device, weighted=True, scale=30.0, label_smoothing=0.1, lse_square_scale=1e-3,
                softcap=15.0),
    ]


def baseline(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """What PyTorch itself computes for cross_entropy's arguments: F.cross_entropy of the
    capped logits (torch.tanh), plus the z-loss from torch.logsumexp, as Liger-Kernel
    defines it. The yardstick of the agreement checks."""
    z = softcap * torch.tanh(input / softcap) if softcap else input
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if not lse_square_scale:
        return F.cross_entropy(z, target, reduction=reduction, **kwargs)
    class_dim = 0 if input.dim() == 1 else 1
    z_loss = lse_square_scale * torch.logsumexp(z, dim=class_dim) ** 2
    losses = F.cross_entropy(z, target, reduction="none", **kwargs)
    if target.is_floating_point():
        divisor = torch.tensor(float(losses.numel()), dtype=losses.dtype, device=losses.device)
    else:
        kept = target != ignore_index
        z_loss = torch.where(kept, z_loss, 0.0)
        w_target = weight[torch.where(kept, target, 0)] if weight is not None else torch.ones_like(losses)
        divisor = (w_target * kept).sum()
    losses = losses + z_loss
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / divisor


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
    baseline=baseline,
    dispatcher_ops=("cross_entropy_forward", "cross_entropy_backward"),
    fakes={"cross_entropy_forward": cross_entropy_forward_fake,
           "cross_entropy_backward": cross_entropy_backward_fake,
           "cross_entropy_backward_": cross_entropy_backward_inplace_fake,
           "cross_entropy_shard_backward": cross_entropy_shard_backward_fake},
    capabilities={INPLACE_BACKWARD: "cross_entropy_backward_", SHARD_BACKWARD: "cross_entropy_shard_backward"},
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
