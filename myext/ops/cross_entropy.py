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
from .._validation import REDUCTIONS, check_float_dtype, check_tensor, needs_grad, transforms_active
from ..backends import has_capability, op
from ..distributed import VocabParallel, from_dtensor, is_dtensor, to_local
from ._losses import (NO_EXTRAS, SHARD_BACKWARD, CrossEntropyOutput, Extras, Options, check_class_weight,
                      check_lm_options, check_options, check_target, cross_entropy_2d, finish, finish_lm, plan,
                      plan_lm, probability_target_grad, reduce_rows, reference_logprob_entropy, reference_objective,
                      reference_rows, refuse_class_weight_tangent, row_logprob, row_tangents)
from ._vocab_parallel import (VocabParallelCrossEntropyFunction, combine_shards, shard_logit_statistics, shard_weight,
                              vocab_parallel_extras_reference, vocab_parallel_reference)

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
    temperature: float = 1.0,
) -> bool:
    """Checks the arguments of cross_entropy; returns True for probability targets."""
    check_tensor("input", input)
    check_tensor("target", target)
    check_float_dtype("input", input)
    shape = input.shape
    if len(shape) < 1:
        raise ValueError("input must be (C), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor")
    check_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, temperature)
    classes = shape[0] if len(shape) == 1 else shape[1]
    check_class_weight(weight, classes, input)
    # A tuple of indexed sizes: slicing and adding torch.Size objects costs a microsecond
    # on every call.
    class_shape = () if len(shape) == 1 else (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
    return check_target(target, input, ignore_index, class_shape=class_shape, prob_shape=input.shape,
                        prob_shape_name="the input's shape")


# --------------------------------------------------------------------------- fake kernels

def cross_entropy_forward_fake(input, target, weight, sample_weight, reduction, ignore_index, label_smoothing,
                               lse_square_scale, softcap, temperature, entropy):
    rows = input.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    row_max, row_log_sum, target_logit = (input.new_empty((rows,), dtype=acc) for _ in range(3))
    row_entropy = input.new_empty((rows,) if entropy else (0,), dtype=acc)
    return loss, row_max, row_log_sum, target_logit, input.new_empty((), dtype=acc), row_entropy


def cross_entropy_backward_fake(grad_loss, input, target, weight, sample_weight, row_max, row_log_sum, total_weight,
                                grad_logprob, grad_entropy, row_entropy, reduction, ignore_index, label_smoothing,
                                lse_square_scale, softcap, temperature, entropy):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_shard_backward_fake(grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                                     row_weight, total_weight, weight_sum, grad_logprob, grad_entropy, row_entropy,
                                     reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
                                     temperature, entropy, class_start, classes):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, sample_weight, row_max, row_log_sum,
                                        total_weight, grad_logprob, grad_entropy, row_entropy, reduction,
                                        ignore_index, label_smoothing, lse_square_scale, softcap, temperature,
                                        entropy):
    return None


# --------------------------------------------------------------------------- autograd


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    ``CrossEntropyFunction.apply(input, target, weight, sample_weight, options, backend,
    inplace_backward, return_rows)`` with ``options`` an :class:`Options`; the arguments
    already checked and reshaped to two dimensions (see myext.cross_entropy);
    ``sample_weight`` (R,) or None, not differentiated here (myext.cross_entropy applies
    weights that require grad itself). Returns the loss, and with ``return_rows`` (the
    default) each row's max and log(sum(exp(z - max))) of the logits z (capped, over
    the temperature) and the target's z, not differentiable (for myext.cross_entropy's
    extras), then, differentiable, each row's log-probability of its target (None for
    probabilities) and, where ``options.entropy`` asks, its entropy (else None); without
    them autograd tracks one output. Forward keeps the two numbers per row for backward,
    the mean's divisor and the entropies. Backward differentiates the loss and the
    log-probabilities and entropies together, in one pass of the backward kernel. With
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
                sample_weight: Optional[torch.Tensor], options: Options, backend: str, inplace_backward: bool,
                return_rows: bool = True):
        loss, row_max, row_log_sum, target_logit, total_weight, row_entropy = op("cross_entropy_forward", backend)(
            input, target, weight, sample_weight, *options.args)
        _save(ctx, (input, target, weight, sample_weight, options, backend, inplace_backward), row_max, row_log_sum,
              total_weight, row_entropy)
        if not return_rows:
            return loss
        logprob = (None if target.is_floating_point()
                   else row_logprob(row_max, row_log_sum, target_logit, target, options.ignore_index))
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit)
        # Backward gets None, not a tensor of zeros made on every call, for the extras.
        ctx.set_materialize_grads(False)
        return loss, row_max, row_log_sum, target_logit, logprob, row_entropy if options.entropy else None

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], _grad_max=None, _grad_log_sum=None,
                 _grad_target_logit=None, grad_logprob: Optional[torch.Tensor] = None,
                 grad_entropy: Optional[torch.Tensor] = None):
        if grad_loss is None and grad_logprob is None and grad_entropy is None:
            return (None,) * len(ctx.needs_input_grad)  # no output took part in what is differentiated
        input, target, weight, sample_weight, row_max, row_log_sum, total_weight, row_entropy = ctx.saved_tensors
        options = ctx.options
        grad_input = grad_target = None
        # The target's gradient reads the logits, so it comes before any in-place write.
        if ctx.needs_input_grad[1] and target.is_floating_point() and grad_loss is not None:
            grad_target = probability_target_grad(grad_loss, input, target, weight, options, sample_weight,
                                                  total_weight)
        if ctx.needs_input_grad[0]:
            if grad_loss is None:
                grad_loss = input.new_zeros((input.shape[0],) if options.reduction == REDUCTIONS["none"] else ())
            row_entropy = row_entropy if grad_entropy is not None else None
            args = (grad_loss, input, target, weight, sample_weight, row_max, row_log_sum, total_weight, grad_logprob,
                    grad_entropy, row_entropy)
            if torch.is_grad_enabled():
                function = CrossEntropyBackwardJvpFunction if transforms_active() else CrossEntropyBackwardFunction
                grad_input = function.apply(*args, options, ctx.backend)
            elif ctx.inplace_backward and not (transforms_active() or is_legacy_batched(grad_loss)):
                op("cross_entropy_backward_", ctx.backend)(*args, *options.args)
                # The dispatcher does not bump versions for custom ops run in backward.
                torch.autograd.graph.increment_version(input)
                grad_input = input
            else:
                grad_input = op("cross_entropy_backward", ctx.backend)(*args, *options.args)
        return (grad_input, grad_target) + (None,) * (len(ctx.needs_input_grad) - 2)


def _save(ctx: Any, inputs: tuple, row_max: torch.Tensor, row_log_sum: torch.Tensor, total_weight: torch.Tensor,
          row_entropy: torch.Tensor) -> None:
    input, target, weight, sample_weight, ctx.options, ctx.backend, ctx.inplace_backward = inputs
    ctx.save_for_backward(input, target, weight, sample_weight, row_max, row_log_sum, total_weight, row_entropy)


class CrossEntropyJvpFunction(CrossEntropyFunction):
    """:class:`CrossEntropyFunction` in the ``setup_context`` form, for calls under
    ``forward_ad`` or a torch.func transform: vmapped through the dispatcher ops'
    batching rules (generate_vmap_rule), with forward-mode AD. Returns the loss and,
    not differentiable, the rows' statistics, the mean's divisor and the entropies
    (outputs, so that torch.func can save them). The loss's tangent is each row's
    gradient, from the backward kernel and the row statistics of forward, dotted with
    the tangent of its logits (and of its probabilities), then reduced as the loss is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                sample_weight: Optional[torch.Tensor], options: Options, backend: str, inplace_backward: bool):
        return op("cross_entropy_forward", backend)(input, target, weight, sample_weight, *options.args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, row_max, row_log_sum, target_logit, total_weight, row_entropy = output
        _save(ctx, inputs, row_max, row_log_sum, total_weight, row_entropy)
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit, total_weight, row_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(*inputs[:4], row_max, row_log_sum, total_weight)

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[torch.Tensor], target_t: Optional[torch.Tensor],
            weight_t: Optional[torch.Tensor], *_constants):
        input, target, weight, sample_weight, row_max, row_log_sum, total_weight = ctx.saved_tensors
        refuse_class_weight_tangent(weight_t)
        rows = row_tangents(input, target, weight, sample_weight, row_max, row_log_sum, total_weight, ctx.options,
                            ctx.backend, input_t, target_t)
        return reduce_rows(rows, total_weight, ctx.options.reduction, input.dtype), None, None, None, None, None


class CrossEntropyBackwardFunction(torch.autograd.Function):
    """The backward of cross-entropy as a differentiable function, for double backward.

    Forward runs the backend's backward kernel; its backward differentiates the
    reference's gradient (torch ops) again, which makes double and higher backward
    exact for every option, the log-probabilities' and entropies' upstream gradients
    included.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, input, target, weight, sample_weight, row_max, row_log_sum, total_weight, grad_logprob,
                grad_entropy, row_entropy, options: Options, backend: str):
        return op("cross_entropy_backward", backend)(grad_loss, input, target, weight, sample_weight, row_max,
                                                      row_log_sum, total_weight, grad_logprob, grad_entropy,
                                                      row_entropy, *options.args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        grad_loss, input, target, weight, sample_weight = inputs[:5]
        grad_logprob, grad_entropy = inputs[8:10]
        ctx.options = inputs[11]
        ctx.save_for_backward(grad_loss, input, target, weight, sample_weight, grad_logprob, grad_entropy)

    @staticmethod
    def backward(ctx: Any, grad_grad_input):
        grad_loss, input, target, weight, sample_weight, grad_logprob, grad_entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = (needs[0], needs[1], needs[2] and target.is_floating_point(), needs[8] and grad_logprob is not None,
                  needs[9] and grad_entropy is not None)
        grads = vjp_of(lambda g, x, t, g_lp, g_h: reference_input_grad(g, x, t, weight, ctx.options, sample_weight,
                                                                         g_lp, g_h),
                       (grad_loss, input, target, grad_logprob, grad_entropy), grad_grad_input, wanted)
        return (*grads[:3], None, None, None, None, None, *grads[3:], None, None, None)


class CrossEntropyBackwardJvpFunction(CrossEntropyBackwardFunction):
    """:class:`CrossEntropyBackwardFunction` with forward-mode AD, for
    forward-over-reverse (torch.func.hessian): the tangent of the reference's gradient
    (myext._derivatives.jvp_of), exact for every option as its backward is."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        CrossEntropyBackwardFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:5], *inputs[8:10])

    @staticmethod
    def jvp(ctx: Any, grad_loss_t, input_t, target_t, _weight_t, _sample_weight_t, _row_max_t, _row_log_sum_t,
            _total_weight_t, grad_logprob_t, grad_entropy_t, *_constants):
        # The class weights' tangent is not read: torch.func hands saved tensors one
        # of zeros here, and a real one was refused by CrossEntropyJvpFunction already.
        grad_loss, input, target, weight, sample_weight, grad_logprob, grad_entropy = ctx.saved_tensors
        return jvp_of(lambda g, x, t, g_lp, g_h: reference_input_grad(g, x, t, weight, ctx.options, sample_weight,
                                                                        g_lp, g_h),
                      (grad_loss, input, target, grad_logprob, grad_entropy),
                      (grad_loss_t, input_t, target_t if target.is_floating_point() else None,
                       grad_logprob_t if grad_logprob is not None else None,
                       grad_entropy_t if grad_entropy is not None else None))


def reference_input_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                         weight: Optional[torch.Tensor], options: Options,
                         sample_weight: Optional[torch.Tensor] = None, grad_logprob: Optional[torch.Tensor] = None,
                         grad_entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference's gradient with respect to ``input`` of the loss times
    ``grad_loss``, plus the log-probabilities times ``grad_logprob`` and the entropies
    times ``grad_entropy`` where given, as a graph that differentiates again."""
    if grad_logprob is None and grad_entropy is None:
        return vjp_of(lambda x: options.reference(x, target, weight, sample_weight), (input,), grad_loss, (True,))[0]

    def objective(x):
        return reference_objective(x, target, weight, sample_weight, options, grad_loss, grad_logprob, grad_entropy)

    return vjp_of(objective, (input,), torch.ones((), dtype=acc_dtype(input.dtype), device=input.device), (True,))[0]


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
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    return_logprob: bool = False,
    return_entropy: bool = False,
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
        sample_weight: a weight per element of the target's batch shape (Keras's name:
            a weight per sample, here per token), multiplying that element's loss: a
            mask by document, a reward, a token's own scale. For ``"mean"`` the divisor
            becomes the sum of ``sample_weight * weight[target]`` over the elements not
            ignored (of ``sample_weight`` for probabilities), as class weights already
            enter it. Differentiable: its gradient is each element's loss (over the
            divisor).
        normalizer: a number, or a 0-d tensor on the input's device, that replaces
            ``"mean"``'s divisor: the count of tokens of the whole batch (Hugging Face's
            ``num_items_in_batch``), so that micro-batches and data-parallel ranks each
            divide by the global count and their gradients add up to the full batch's.
            A tensor is never read on the host (no sync; safe in a CUDA graph).
        shift: scores position ``t`` of the target's last dimension against target
            ``t + shift`` and drops the last ``shift`` positions, as a causal language
            model's loss does (``shift=1``: logits and labels passed as they are). No
            copy of the logits; class-index targets only. ``"none"`` returns the
            ``T - shift`` positions kept.
        temperature: divides the (capped) logits before the softmax, for sampling
            ratios in reinforcement learning and for distillation; > 0, 1 by default.
        lse_square_scale: the z-loss of PaLM: adds ``lse_square_scale * lse**2`` to the
            loss of each element not ignored, before the reduction (so ``"mean"`` divides
            it by the same divisor), ``lse`` the log-sum-exp of its logits.
        softcap: caps the logits at ``softcap * tanh(input / softcap)`` before the
            softmax (Gemma 2's logit soft-capping); ``None`` (default) leaves them.
        return_lse: also return each element's log-sum-exp (of the capped logits), for
            logging: computed in the same pass, no gradient flows through it.
        return_accuracy: also return the token accuracy (class-index targets), computed
            in the same pass, no gradient.
        return_logprob: also return each element's log-probability of its target
            (class-index targets), differentiable, from the same pass: what PPO and GRPO
            losses are built on. 0 where the target is ignored.
        return_entropy: also return the entropy of each element's softmax,
            differentiable, from the same pass (an entropy bonus). 0 where the target is
            ignored.
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
        the loss returned in the input's dtype. With any ``return_*`` flag, a
        :class:`CrossEntropyOutput` ``(loss, lse, accuracy, logprob, entropy)``, None
        for those not asked; the per-element ones in float32 (float64 for float64).

    Example::

        >>> logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> torch.allclose(myext.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
        True
        >>> out = myext.cross_entropy(logits, labels, lse_square_scale=1e-4, return_lse=True,
        ...                           return_accuracy=True)
        >>> out.loss, out.lse, out.accuracy
    """
    if is_dtensor(input):
        mesh = input.device_mesh
        input, vocab_parallel = from_dtensor(input, 0 if input.dim() == 1 else 1)
        target, weight = to_local(target, mesh, "target"), to_local(weight, mesh, "weight")
        sample_weight = to_local(sample_weight, mesh, "sample_weight")
    if vocab_parallel is not None:
        weight = shard_weight(weight, vocab_parallel)
    probabilities = check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                        lse_square_scale, softcap, temperature)
    want = (Extras(return_lse, return_accuracy, return_logprob, return_entropy)
            if return_lse or return_accuracy or return_logprob or return_entropy else NO_EXTRAS)
    if sample_weight is not None or normalizer is not None or shift or want.logprob:
        check_lm_options(sample_weight, normalizer, shift, reduction, _batch_shape(input.shape), probabilities,
                         input, want)
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True would overwrite input, a leaf tensor that requires grad, with "
                         "its own gradient; use it for logits computed by an earlier op")
    if inplace_backward and vocab_parallel is not None:
        raise ValueError("inplace_backward is not available with vocab_parallel")
    if (want.logprob or want.entropy) and transforms_active():
        raise NotImplementedError("return_logprob and return_entropy support reverse-mode autograd: not "
                                  "forward-mode AD (torch.autograd.forward_ad) or torch.func's transforms")
    target, name = plan(NAME, backend, input.device, target, probabilities, ignore_index,
                        input.shape[0 if input.dim() == 1 else 1], vocab_parallel, "input's class dimension",
                        return_accuracy)
    lm = None
    if sample_weight is not None or normalizer is not None or shift:
        lm = plan_lm(target, sample_weight, normalizer, shift, reduction, ignore_index)
        target, sample_weight = lm.target, lm.sample_weight

    # The kernels see rows of classes: (R, C) logits and (R,) or (R, C) targets.
    input_2d, target_2d, batch_shape = _as_rows(input, target, probabilities)
    sample_rows = sample_weight.reshape(-1) if sample_weight is not None else None
    options = Options.of(lm.reduction if lm is not None else reduction, ignore_index, label_smoothing,
                         lse_square_scale, softcap, temperature, want.entropy)
    rows = None  # the rows' statistics and extras, where a path gives them
    if vocab_parallel is not None and name == "torch":
        loss = vocab_parallel_reference(input_2d, target_2d, weight, options, vocab_parallel, sample_rows)
        if want.rows:
            with torch.no_grad():
                statistics = shard_logit_statistics(input_2d, target_2d, weight, options, vocab_parallel, name)
                combined = combine_shards(statistics, target_2d, options, vocab_parallel)
            rows = (combined.row_max, combined.row_log_sum, combined.target_logit,
                    *vocab_parallel_extras_reference(input_2d, target_2d, options, vocab_parallel))
    elif vocab_parallel is not None:
        loss, *rows = VocabParallelCrossEntropyFunction.apply(input_2d, target_2d, weight, sample_rows, options,
                                                              vocab_parallel, name)
    elif name == "torch":
        loss = options.reference(input_2d, target_2d, weight, sample_rows)
        if want.rows:
            rows = (*reference_rows(input_2d, target_2d, options),
                    *reference_logprob_entropy(input_2d, target_2d, options))
    elif not needs_grad(input_2d, target_2d):
        loss, row_max, row_log_sum, target_logit, _, row_entropy = op("cross_entropy_forward", name)(
            input_2d, target_2d, weight, sample_rows, *options.args)
        if want.rows:
            logprob = (row_logprob(row_max, row_log_sum, target_logit, target_2d, ignore_index)
                       if want.logprob else None)
            rows = (row_max, row_log_sum, target_logit, logprob, row_entropy)
    else:
        inplace = (inplace_backward and input_2d.is_contiguous()
                   and has_capability(NAME, INPLACE_BACKWARD, name, input.device))
        if transforms_active():
            loss, row_max, row_log_sum, target_logit, *_ = CrossEntropyJvpFunction.apply(
                input_2d, target_2d, weight, sample_rows, options, name, inplace)
            rows = (row_max, row_log_sum, target_logit, None, None)
        elif want.rows:
            loss, *rows = CrossEntropyFunction.apply(input_2d, target_2d, weight, sample_rows, options, name,
                                                     inplace)
        else:
            loss = CrossEntropyFunction.apply(input_2d, target_2d, weight, sample_rows, options, name, inplace,
                                              False)
    result = finish(loss, rows, target_2d, options, batch_shape, want)
    return finish_lm(result, lm, reduction, target_2d, weight, ignore_index) if lm is not None else result


def _batch_shape(shape: torch.Size) -> tuple[int, ...]:
    """The shape of the unreduced loss of logits of ``shape``: (C) -> (), (N, C, d1, ...) ->
    (N, d1, ...)."""
    return () if len(shape) == 1 else (shape[0], *shape[2:])


# --------------------------------------------------------------------------- the spec


def reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """cross_entropy's loss with its arguments, from elementary torch ops: the executable
    spec. ``shift`` is slicing here (logits ``[..., :T - shift]`` against target
    ``[..., shift:]``), and ``normalizer`` a division of the sum."""
    if shift:
        input = input[..., :input.shape[-1] - shift] if input.dim() > 2 else input[:input.shape[0] - shift]
        target, sample_weight = (t[..., shift:] if t is not None else None for t in (target, sample_weight))
    input_2d, target_2d, batch_shape = _as_rows(input, target, target.is_floating_point())
    loss = cross_entropy_2d(input_2d, target_2d, weight, ignore_index, "sum" if normalizer is not None else reduction,
                            float(label_smoothing), lse_square_scale, softcap, temperature,
                            sample_weight.reshape(-1) if sample_weight is not None else None)
    if normalizer is not None:
        return loss / normalizer
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
        *lm_samples(device),
    ]


def _with(sample: registry.Sample, described: str, **kwargs: Any) -> registry.Sample:
    """``sample`` with more keyword arguments, named with ``described`` added."""
    return registry.Sample(sample.args, {**sample.kwargs, **kwargs}, name=sample.name + described)


def lm_samples(device: str) -> list[registry.Sample]:
    """A language model's options: per-token weights (one sample differentiates them),
    shift along the last dimension, temperature over a soft cap, and the exact
    normalizer (a 0-d tensor)."""

    def weights(*shape):
        return torch.rand(*shape, dtype=torch.float64, device=device).add(0.5)

    weighted = _sample((2, 5, 4), device, shift=1, temperature=0.7, softcap=3.0)
    weighted = _with(weighted, ", sample_weight", sample_weight=weights(2, 4))
    learned = _sample((6, 5), device, reduction="none", temperature=1.5)
    learned = _with(learned, ", sample_weight that requires grad",
                    sample_weight=weights(6).requires_grad_())
    normalized = _sample((6, 5), device, weighted=True, shift=2, label_smoothing=0.1)
    normalized = _with(normalized, ", normalizer", normalizer=torch.tensor(5.0, dtype=torch.float64, device=device))
    prob = _sample((4, 5), device, kind="prob", temperature=2.0, reduction="sum")
    prob = _with(prob, ", sample_weight", sample_weight=weights(4))
    return [weighted, learned, normalized, prob]


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
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """What PyTorch itself computes for cross_entropy's arguments: F.cross_entropy of the
    capped logits (torch.tanh) over the temperature, plus the z-loss from
    torch.logsumexp, as Liger-Kernel defines it; per-token weights, the normalizer and
    the shift as a training loop writes them (slicing, weighting the unreduced loss,
    dividing its sum). The yardstick of the agreement checks."""
    if shift:
        input = input[..., :input.shape[-1] - shift] if input.dim() > 2 else input[:input.shape[0] - shift]
        target, sample_weight = (t[..., shift:] if t is not None else None for t in (target, sample_weight))
    z = softcap * torch.tanh(input / softcap) if softcap else input
    z = z / temperature if temperature != 1.0 else z
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if not lse_square_scale and sample_weight is None and normalizer is None:
        return F.cross_entropy(z, target, reduction=reduction, **kwargs)
    class_dim = 0 if input.dim() == 1 else 1
    losses = F.cross_entropy(z, target, reduction="none", **kwargs)
    if target.is_floating_point():
        kept, w_target = None, torch.ones_like(losses)
    else:
        kept = target != ignore_index
        w_target = (weight[torch.where(kept, target, 0)] if weight is not None else torch.ones_like(losses)) * kept
    if lse_square_scale:
        z_loss = lse_square_scale * torch.logsumexp(z, dim=class_dim) ** 2
        losses = losses + (torch.where(kept, z_loss, 0.0) if kept is not None else z_loss)
    if sample_weight is not None:
        losses, w_target = losses * sample_weight, w_target * sample_weight
    if reduction == "none":
        return losses
    if reduction == "sum" or normalizer is not None:
        return losses.sum() / normalizer if normalizer is not None else losses.sum()
    return losses.sum() / w_target.sum()


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
