"""Cross-entropy of logits against class indices or class probabilities.

Dispatcher ops (schemas in csrc/myext.cpp): ``myext::cross_entropy_forward``,
``myext::cross_entropy_backward`` and, where a backend has it, the in-place
``myext::cross_entropy_backward_``; kernels in csrc/cpu/cross_entropy.cpp,
csrc/cuda/cross_entropy.cu and triton_ops/cross_entropy.py. This module holds the
rest of the op: its argument checks, fake kernels, autograd Functions, the public
function with the semantics of ``F.cross_entropy``, the plain-PyTorch reference, and
its registry spec (samples and benchmark cases). What it shares with
linear_cross_entropy (the options, the common checks, the reference of rows) is in
myext/ops/_losses.py, the vocabulary-parallel mode in myext/ops/_vocab_parallel.py.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from .. import registry
from .._batching import is_legacy_batched
from .._derivatives import jvp_of, vjp_of
from .._library import acc_dtype
from .._validation import check_float_dtype, check_tensor, needs_grad, transforms_active
from ..backends import has_capability, op
from ..distributed import VocabParallel, from_dtensor, is_dtensor, to_local
from ._losses import (SHARD_BACKWARD, CrossEntropyOutput, Options, check_class_weight, check_options, check_target,
                      cross_entropy_2d, finish, plan, probability_target_grad, reduce_rows, reference_rows,
                      refuse_class_weight_tangent, row_tangents)
from ._vocab_parallel import (VocabParallelCrossEntropyFunction, combine_shards, shard_logit_statistics, shard_weight,
                              vocab_parallel_reference)

__all__ = ["CrossEntropyBackwardFunction", "CrossEntropyFunction", "CrossEntropyJvpFunction", "CrossEntropyOutput",
           "Options", "cross_entropy", "cross_entropy_2d", "reference"]

NAME = "cross_entropy"
INPLACE_BACKWARD = "inplace_backward"
# The backward of a shard of the classes (myext.distributed's vocabulary parallelism).


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


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    ``CrossEntropyFunction.apply(input, target, weight, options, backend,
    inplace_backward, return_rows)`` with ``options`` an :class:`Options`; the arguments
    already checked and reshaped to two dimensions (see myext.cross_entropy). Returns the
    loss, and with ``return_rows`` (the default), not differentiable, each row's max and
    log(sum(exp(z - max))) of the capped logits z and the target's capped logit (for
    myext.cross_entropy's extras); without them autograd tracks one output. Forward
    keeps those two numbers per row for backward, and the mean's divisor. With
    ``inplace_backward`` (cpp and cuda backends, contiguous logits) backward writes the
    gradient over the logits and bumps their version, so any other autograd node that
    saved them raises an error instead of reading it.

    Reverse mode and torch.compile, in PyTorch's older form (forward takes ``ctx``):
    torch 2.13's apply binds a ``setup_context``-form Function's arguments to its
    forward's signature on every call (inspect.signature, about 12 us), and dynamo does
    not trace a Function that defines ``jvp``. :class:`CrossEntropyJvpFunction` is the
    same Function in the ``setup_context`` form, for forward-mode AD and torch.func.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                options: Options, backend: str, inplace_backward: bool, return_rows: bool = True):
        loss, row_max, row_log_sum, target_logit, total_weight = op("cross_entropy_forward", backend)(
            input, target, weight, *options.args)
        _save(ctx, (input, target, weight, options, backend, inplace_backward), row_max, row_log_sum, total_weight)
        if not return_rows:
            return loss
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit)
        # Backward gets None, not a tensor of zeros made on every call, for the extras.
        ctx.set_materialize_grads(False)
        return loss, row_max, row_log_sum, target_logit

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
        return (grad_input, grad_target) + (None,) * (len(ctx.needs_input_grad) - 2)


def _save(ctx: Any, inputs: tuple, row_max: torch.Tensor, row_log_sum: torch.Tensor,
          total_weight: torch.Tensor) -> None:
    input, target, weight, ctx.options, ctx.backend, ctx.inplace_backward = inputs
    ctx.save_for_backward(input, target, weight, row_max, row_log_sum, total_weight)


class CrossEntropyJvpFunction(CrossEntropyFunction):
    """:class:`CrossEntropyFunction` in the ``setup_context`` form, for calls under
    ``forward_ad`` or a torch.func transform: vmapped through the dispatcher ops'
    batching rules (generate_vmap_rule), with forward-mode AD. Returns the loss and,
    not differentiable, the rows' statistics and the mean's divisor (outputs, so that
    torch.func can save them). The loss's tangent is each row's gradient, from the
    backward kernel and the row statistics of forward, dotted with the tangent of its
    logits (and of its probabilities), then reduced as the loss is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], options: Options,
                backend: str, inplace_backward: bool):
        return op("cross_entropy_forward", backend)(input, target, weight, *options.args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, row_max, row_log_sum, target_logit, total_weight = output
        _save(ctx, inputs, row_max, row_log_sum, total_weight)
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit, total_weight)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(*inputs[:3], row_max, row_log_sum, total_weight)

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[torch.Tensor], target_t: Optional[torch.Tensor],
            weight_t: Optional[torch.Tensor], *_constants):
        input, target, weight, row_max, row_log_sum, total_weight = ctx.saved_tensors
        refuse_class_weight_tangent(weight_t)
        rows = row_tangents(input, target, weight, row_max, row_log_sum, total_weight, ctx.options, ctx.backend,
                            input_t, target_t)
        return reduce_rows(rows, total_weight, ctx.options.reduction, input.dtype), None, None, None, None


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
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True would overwrite input, a leaf tensor that requires grad, with "
                         "its own gradient; use it for logits computed by an earlier op")
    if inplace_backward and vocab_parallel is not None:
        raise ValueError("inplace_backward is not available with vocab_parallel")
    target, name = plan(NAME, backend, input.device, target, probabilities, ignore_index,
                        input.shape[0 if input.dim() == 1 else 1], vocab_parallel, "input's class dimension",
                        return_accuracy)

    # The kernels see rows of classes: (R, C) logits and (R,) or (R, C) targets.
    input_2d, target_2d, batch_shape = _as_rows(input, target, probabilities)
    options = Options.of(reduction, ignore_index, label_smoothing, lse_square_scale, softcap)
    row_max = row_log_sum = target_logit = None  # the rows' statistics, where a path gives them
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
        row_max, row_log_sum, target_logit = reference_rows(input_2d, target_2d, options)
    elif not needs_grad(input_2d, target_2d):
        loss, row_max, row_log_sum, target_logit, _ = op("cross_entropy_forward", name)(
            input_2d, target_2d, weight, *options.args)
    else:
        inplace = (inplace_backward and input_2d.is_contiguous()
                   and has_capability(NAME, INPLACE_BACKWARD, name, input.device))
        if transforms_active():
            loss, row_max, row_log_sum, target_logit, _ = CrossEntropyJvpFunction.apply(
                input_2d, target_2d, weight, options, name, inplace)
        elif return_lse or return_accuracy:
            loss, row_max, row_log_sum, target_logit = CrossEntropyFunction.apply(input_2d, target_2d, weight,
                                                                                  options, name, inplace)
        else:
            loss = CrossEntropyFunction.apply(input_2d, target_2d, weight, options, name, inplace, False)
    return finish(loss, row_max, row_log_sum, target_logit, target_2d, options, batch_shape, return_lse,
                  return_accuracy)


# --------------------------------------------------------------------------- the spec


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
