"""Fused linear + cross-entropy: the loss of ``F.linear(input, linear_weight, linear_bias)``
as logits, which are never held whole.

Dispatcher ops (schemas in csrc/myext.cpp): ``myext::linear_cross_entropy_forward`` and
``myext::linear_cross_entropy_backward``; kernels in csrc/cpu/linear_cross_entropy.cpp,
csrc/cuda/linear_cross_entropy.cpp and triton_ops/linear_cross_entropy.py, each a loop
over chunks of rows that runs the cross-entropy row kernels of its backend on one chunk
of logits at a time. This module holds the rest of the op: its argument checks, fake
kernels, autograd Function, the public function with the semantics of
``F.linear_cross_entropy``, the plain-PyTorch reference and its registry spec. The
options, the common checks and the per-row outputs are shared with cross_entropy
(myext/ops/_losses.py); the vocabulary-parallel Function is in
myext/ops/_vocab_parallel.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .. import registry
from .._library import acc_dtype
from .._batching import is_legacy_batched
from .._derivatives import vjp_of
from .._validation import REDUCTIONS, check_float_dtype, check_same, check_tensor, needs_grad, transforms_active
from ..backends import op
from . import cross_entropy as ce
from ._losses import (NO_EXTRAS, SHARD_BACKWARD, CrossEntropyOutput, Extras, Options, check_class_weight,
                      check_lm_options, check_options, check_target, cross_entropy_2d, finish, finish_lm, plan,
                      plan_lm, probability_target_grad, reduce_rows, reference_logprob_entropy, reference_objective,
                      reference_rows, refuse_class_weight_tangent, row_logprob, row_tangents)
from ._vocab_parallel import (VocabParallelLinearCrossEntropyFunction, combine_shards, shard_logit_statistics,
                              shard_weight, vocab_parallel_extras_reference, vocab_parallel_reference)
from .linear_relu import affine, affine_tangent
from ..distributed import VocabParallel, from_dtensor, is_dtensor, replicated, to_local

__all__ = ["LinearCrossEntropyFunction", "default_chunk_size", "linear_cross_entropy", "reference"]

NAME = "linear_cross_entropy"

# As csrc/linear_cross_entropy.h: a chunk's logits take at most about this many bytes,
# or this many rows where that is more (up to 1/8 of the rows).
CHUNK_BYTES = 32 << 20
FULL_SPEED_ROWS = 256


def default_chunk_size(rows: int, classes: int, dtype: torch.dtype, device: Optional[torch.device] = None) -> int:
    """Rows per chunk when none is given: a chunk's logits take at most about 32 MiB
    (at most 1/8 of the logits from 256 MiB of them on). Where a vocabulary is so large
    that 32 MiB holds fewer than 256 rows, a chunk may take 256 rows, or 1/8 of all of
    them if that is fewer (the step's memory budget): a GEMM over fewer rows reads the
    whole weight for too little work to run at full speed. The rows are then shared
    equally among the chunks that makes, so that no chunk is cut short.

    The same rule on every device and in every backend (csrc/linear_cross_entropy.h);
    ``device`` is accepted for callers that pass it."""
    fit = CHUNK_BYTES // max(1, classes * dtype.itemsize)
    most = max(1, min(rows, max(fit, min(FULL_SPEED_ROWS, rows // 8))))
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


# --------------------------------------------------------------------------- checks

def check_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    chunk_size: Optional[int],
    temperature: float = 1.0,
    accum_dtype: Optional[torch.dtype] = None,
) -> bool:
    """Checks the arguments of linear_cross_entropy; returns True for probability targets."""
    check_tensor("input", input)
    check_tensor("linear_weight", linear_weight)
    check_tensor("target", target)
    check_float_dtype("input", input)
    if input.dim() < 1:
        raise ValueError("input must be (H), (N, H) or (*, H), got a 0-d tensor")
    check_same("linear_weight", linear_weight, "input", input)
    if linear_weight.dim() < 2:
        raise ValueError(f"linear_weight must be (C, H) or (C, d1, ..., dk, H), got shape {tuple(linear_weight.shape)}")
    # Indexed sizes, not slices of torch.Size (a microsecond on every call), for a plain head.
    features, classes = input.shape[-1], linear_weight.shape[0]
    positions = () if linear_weight.dim() == 2 else tuple(linear_weight.shape[1:-1])
    if linear_weight.shape[-1] != features:
        raise ValueError(f"linear_weight must have the input's features last, (C, ..., {features}), "
                         f"got {tuple(linear_weight.shape)}")
    if positions and input.dim() != 2:
        raise ValueError(f"a K-dimensional head (linear_weight {tuple(linear_weight.shape)}) needs input (N, "
                         f"{features}), as F.linear_cross_entropy's, got {tuple(input.shape)}")
    if linear_bias is not None:
        check_tensor("linear_bias", linear_bias)
        check_same("linear_bias", linear_bias, "input", input)
        if linear_bias.shape != (classes, *positions):
            raise ValueError(f"linear_bias must have shape {(classes, *positions)}, linear_weight's without its "
                             f"last dimension, got {tuple(linear_bias.shape)}")
    check_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, temperature)
    check_class_weight(weight, classes, input)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if accum_dtype is not None and accum_dtype not in (acc_dtype(input.dtype), input.dtype):
        raise ValueError(f"accum_dtype must be None, {acc_dtype(input.dtype)} or the input's dtype "
                         f"{input.dtype}, got {accum_dtype!r}")
    batch = input.shape[:-1]
    if positions:  # F.cross_entropy's K-dimensional form of the logits (N, C, d1, ..., dk)
        return check_target(target, input, ignore_index, class_shape=(*batch, *positions),
                               prob_shape=(*batch, classes, *positions), prob_shape_name="the shape (N, C, d1, ..., dk)")
    return check_target(target, input, ignore_index, class_shape=batch, prob_shape=batch + (classes,),
                           prob_shape_name="the shape (*, C)")


# --------------------------------------------------------------------------- fake kernels

def _grad_fakes(input, linear_weight, linear_bias, mask):
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0] else None,
            torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if mask[1] else None,
            linear_weight.new_empty(linear_weight.shape[:1]) if mask[2] else None)


def linear_cross_entropy_forward_fake(input, linear_weight, linear_bias, target, weight, sample_weight, reduction,
                                      ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy,
                                      chunk_size, grad_mask, accum_dtype=None):
    rows = input.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    row_max, row_log_sum, target_logit = (input.new_empty((rows,), dtype=acc) for _ in range(3))
    row_entropy = input.new_empty((rows,) if entropy else (0,), dtype=acc)
    grads = (_grad_fakes(input, linear_weight, linear_bias, grad_mask) if reduction != 0
             else (None, None, None))
    return (loss, row_max, row_log_sum, target_logit, input.new_empty((), dtype=acc), row_entropy, *grads)


def linear_cross_entropy_backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight,
                                       row_max, row_log_sum, total_weight, grad_logprob, grad_entropy, row_entropy,
                                       reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
                                       temperature, entropy, chunk_size, output_mask, accum_dtype=None):
    return _grad_fakes(input, linear_weight, linear_bias, output_mask)


def linear_cross_entropy_shard_backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight,
                                             sample_weight, row_max, row_log_sum, row_weight, total_weight,
                                             weight_sum, grad_logprob, grad_entropy, row_entropy, reduction,
                                             ignore_index, label_smoothing, lse_square_scale, softcap, temperature,
                                             entropy, class_start, classes, chunk_size, output_mask,
                                             accum_dtype=None):
    return _grad_fakes(input, linear_weight, linear_bias, output_mask)


# --------------------------------------------------------------------------- autograd

class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` (rows (R, H)) against
    class indices (R,) or probabilities (R, C).

    ``LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight,
    sample_weight, options, chunk_size, accum_dtype, backend, return_rows)``, the arguments checked and
    reshaped to rows (see myext.linear_cross_entropy); ``sample_weight`` (R,) or None,
    not differentiated here. Returns the loss and, with ``return_rows`` (the default),
    the rows' outputs as :class:`~myext.ops.cross_entropy.CrossEntropyFunction` gives
    them: not differentiable, each row's max and log-sum of the logits and the target's
    logit; differentiable, its log-probability of the target (None for probabilities)
    and, where ``options.entropy`` asks, its entropy. Without them autograd tracks one
    output.

    For reduction mean or sum, forward computes the loss's gradients in the same pass
    over the chunks (for an upstream gradient of 1) and the first backward scales them
    in place: the chunk's logits are made once. Any other backward (reduction none, a
    second one through a retained graph, the log-probabilities' or entropies' gradients)
    makes the logits again: a reduced loss for an upstream gradient of 1, scaled
    afterwards, which gives the first backward's bits, and the extras' gradients added
    in that one pass. Double backward goes through the reference (torch ops, which hold
    the logits); so does the gradient of probability targets, itself the logits' size.

    Reverse mode and torch.compile, in PyTorch's older form (forward takes ``ctx``), as
    :class:`~myext.ops.cross_entropy.CrossEntropyFunction` is, and for the same reasons;
    :class:`LinearCrossEntropyJvpFunction` is the ``setup_context`` form, for forward-mode
    AD and torch.func.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                options: Options, chunk_size: int, accum_dtype: Optional[torch.dtype], backend: str,
                return_rows: bool = True):
        mask = [bool(ctx.needs_input_grad[i]) for i in range(3)]
        in_forward = options.reduction != REDUCTIONS["none"] and any(mask)
        (loss, row_max, row_log_sum, target_logit, total_weight, row_entropy,
         *grads) = op("linear_cross_entropy_forward", backend)(
            input, linear_weight, linear_bias, target, weight, sample_weight, *options.args, chunk_size,
            mask if in_forward else [False, False, False], accum_dtype)
        _save(ctx, (input, linear_weight, linear_bias, target, weight, sample_weight, options, chunk_size,
                    accum_dtype, backend),
              row_max, row_log_sum, total_weight, row_entropy)
        # Not saved tensors: the first backward scales them in place and hands them on,
        # so that a step holds each gradient once, not twice.
        ctx.grads_from_forward = grads if in_forward else None
        if not return_rows:
            return loss
        logprob = (None if target.is_floating_point()
                   else row_logprob(row_max, row_log_sum, target_logit, target, options.ignore_index))
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit)
        ctx.set_materialize_grads(False)  # as CrossEntropyFunction's
        return loss, row_max, row_log_sum, target_logit, logprob, row_entropy if options.entropy else None

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], _grad_max=None, _grad_log_sum=None,
                 _grad_target_logit=None, grad_logprob: Optional[torch.Tensor] = None,
                 grad_entropy: Optional[torch.Tensor] = None):
        if grad_loss is None and grad_logprob is None and grad_entropy is None:
            return (None,) * len(ctx.needs_input_grad)  # no output took part in what is differentiated
        input, linear_weight, linear_bias, target, weight, sample_weight = ctx.saved_tensors[:6]
        mask = [bool(ctx.needs_input_grad[i]) for i in range(3)]
        wants_target = bool(ctx.needs_input_grad[3]) and target.is_floating_point() and grad_loss is not None
        # A batch of upstream gradients from torch's older vmap (gradcheck's batched
        # gradients) cannot run the backward op, whose outputs are optional.
        if torch.is_grad_enabled() or any(is_legacy_batched(g) for g in (grad_loss, grad_logprob, grad_entropy)
                                          if g is not None):
            grads = _reference_grads(grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight,
                                     ctx.options, mask, wants_target, grad_logprob, grad_entropy)
        else:
            grad_target = (probability_target_grad(grad_loss, affine(input, linear_weight, linear_bias), target,
                                                   weight, ctx.options, sample_weight, ctx.saved_tensors[8])
                           if wants_target else None)
            grads = (*_kernel_grads(ctx, grad_loss, mask, grad_logprob, grad_entropy), grad_target)
        return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - 4)


def _save(ctx: Any, inputs: tuple, row_max: torch.Tensor, row_log_sum: torch.Tensor, total_weight: torch.Tensor,
          row_entropy: torch.Tensor) -> None:
    (input, linear_weight, linear_bias, target, weight, sample_weight, ctx.options, ctx.chunk_size,
     ctx.accum_dtype, ctx.backend) = inputs[:10]
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, sample_weight, row_max, row_log_sum,
                          total_weight, row_entropy)


class LinearCrossEntropyJvpFunction(LinearCrossEntropyFunction):
    """:class:`LinearCrossEntropyFunction` in the ``setup_context`` form, for calls under
    ``forward_ad`` or a torch.func transform: vmapped through the dispatcher ops'
    batching rules (generate_vmap_rule), with forward-mode AD. Forward computes no
    gradients here (the transforms differentiate through backward, not around it) and
    returns the loss and, not differentiable, the rows' statistics, the mean's divisor
    and the entropies. The tangent goes by chunks of rows, as the kernels do: each
    chunk's logits and their tangent (the product rule over the linear layer), each
    row's gradient from the cross-entropy backward kernel and forward's row statistics,
    dotted with it; the logits are never held whole."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                options: Options, chunk_size: int, accum_dtype: Optional[torch.dtype], backend: str):
        return op("linear_cross_entropy_forward", backend)(
            input, linear_weight, linear_bias, target, weight, sample_weight, *options.args, chunk_size,
            [False, False, False], accum_dtype)[:6]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, row_max, row_log_sum, target_logit, total_weight, row_entropy = output
        _save(ctx, inputs, row_max, row_log_sum, total_weight, row_entropy)
        ctx.grads_from_forward = None
        ctx.mark_non_differentiable(row_max, row_log_sum, target_logit, total_weight, row_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(*inputs[:6], row_max, row_log_sum, total_weight)

    @staticmethod
    def jvp(ctx: Any, input_t, linear_weight_t, linear_bias_t, target_t, weight_t, *_constants):
        (input, linear_weight, linear_bias, target, weight, sample_weight, row_max, row_log_sum,
         total_weight) = ctx.saved_tensors
        refuse_class_weight_tangent(weight_t)
        rows = []
        for start in range(0, input.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            x, x_t = input[chunk], (input_t[chunk] if input_t is not None else None)
            rows.append(row_tangents(
                affine(x, linear_weight, linear_bias), target[chunk], weight,
                sample_weight[chunk] if sample_weight is not None else None, row_max[chunk], row_log_sum[chunk],
                total_weight, ctx.options, ctx.backend,
                affine_tangent(x, linear_weight, x_t, linear_weight_t, linear_bias_t),
                target_t[chunk] if target_t is not None else None))
        loss_t = reduce_rows(torch.cat(rows) if rows else row_max.new_zeros(0), total_weight,
                             ctx.options.reduction, input.dtype)
        return loss_t, None, None, None, None, None


def _kernel_grads(ctx: Any, grad_loss: Optional[torch.Tensor], mask: list[bool],
                  grad_logprob: Optional[torch.Tensor] = None, grad_entropy: Optional[torch.Tensor] = None):
    """The gradients of (input, linear_weight, linear_bias) from the kernels: the first
    time forward's, scaled in place by the upstream gradient; else the backward op's,
    for a reduced loss with an upstream gradient of 1 and scaled afterwards, as
    forward's (the same bits from every backward of one graph). The gradients of the
    log-probabilities and entropies (``grad_logprob``, ``grad_entropy``) take one pass of
    the backward op, added to the loss's."""
    (input, linear_weight, linear_bias, target, weight, sample_weight, row_max, row_log_sum, total_weight,
     row_entropy) = ctx.saved_tensors
    backward = op("linear_cross_entropy_backward", ctx.backend)
    extras = grad_logprob is not None or grad_entropy is not None
    none = ctx.options.reduction == REDUCTIONS["none"]

    def run(upstream, g_lp=None, g_h=None):
        return backward(upstream, input, linear_weight, linear_bias, target, weight, sample_weight, row_max,
                        row_log_sum, total_weight, g_lp, g_h, row_entropy if g_h is not None else None,
                        *ctx.options.args, ctx.chunk_size, mask, ctx.accum_dtype)

    if none:
        if grad_loss is None:
            grad_loss = input.new_zeros(input.shape[0])
        return run(grad_loss, grad_logprob, grad_entropy)
    grads = None
    if grad_loss is not None:
        if ctx.grads_from_forward is not None:
            grads, ctx.grads_from_forward = ctx.grads_from_forward, None
        else:
            grads = run(torch.ones_like(grad_loss))
        scale = grad_loss.to(input.dtype)
        grads = tuple(g.mul_(scale) if g is not None and wanted else None for g, wanted in zip(grads, mask))
    if not extras:
        return grads
    more = run(input.new_zeros(()), grad_logprob, grad_entropy)
    if grads is None:
        return more
    return tuple(g.add_(m) if g is not None else None for g, m in zip(grads, more))


def _reference_grads(grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight, options: Options,
                     mask, wants_target: bool, grad_logprob=None, grad_entropy=None):
    """The gradients of the reference loss (and of the log-probabilities and entropies,
    for their upstream gradients) for (input, linear_weight, linear_bias, target) where
    asked, built from torch ops so that they differentiate again."""
    wanted = (mask[0], mask[1], mask[2] and linear_bias is not None, wants_target)
    if grad_logprob is None and grad_entropy is None:
        return vjp_of(lambda x, w, b, t: options.reference(affine(x, w, b), t, weight, sample_weight),
                      (input, linear_weight, linear_bias, target), grad_loss, wanted)

    def objective(x, w, b, t):
        return reference_objective(affine(x, w, b), t, weight, sample_weight, options, grad_loss, grad_logprob,
                                   grad_entropy)

    return vjp_of(objective, (input, linear_weight, linear_bias, target),
                  torch.ones((), dtype=acc_dtype(input.dtype), device=input.device), wanted)


# --------------------------------------------------------------------------- vocabulary parallelism


# --------------------------------------------------------------------------- the public function

def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    return_logprob: bool = False,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    vocab_parallel: Optional[VocabParallel] = None,
) -> Union[torch.Tensor, CrossEntropyOutput]:
    r"""Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``,
    with the semantics of ``F.linear_cross_entropy``, without ever holding the logits whole.

    The rows of ``input`` go in chunks of ``chunk_size``: each chunk's logits are one
    GEMM into a buffer of ``chunk_size x C``, which the cross-entropy kernels turn into
    the logits' gradient in place for the gradient GEMMs. For the mean and sum reductions
    the gradients are computed in forward, so training makes each chunk's logits once.

    Args:
        input: ``(H)``, ``(N, H)`` or ``(*, H)`` (a language model's ``(B, T, H)``).
        linear_weight: ``(C, H)``, as ``nn.Linear(H, C).weight``.
        target: class indices (int64 or uint8) of the input's batch shape ``(*)``, or class
            probabilities ``(*, C)`` of the input's dtype.
        linear_bias: ``(C)``, or ``None``.
        weight: a weight per class ``(C)``, or ``None``.
        reduction: ``"none"`` (a loss of shape ``(*)``), ``"mean"`` or ``"sum"``, as
            ``F.cross_entropy``'s.
        ignore_index: a class index that contributes neither loss nor gradient; ``None``
            means -100, as in ``F.linear_cross_entropy``.
        label_smoothing: in ``[0, 1]``.
        sample_weight: a weight per element of the input's batch shape ``(*)`` (per
            token), multiplying its loss; ``"mean"`` then divides by the sum of
            ``sample_weight * weight[target]`` over the elements not ignored. As
            :func:`myext.cross_entropy`'s, differentiable.
        normalizer: a number or a 0-d tensor on the input's device that replaces
            ``"mean"``'s divisor (Hugging Face's ``num_items_in_batch``), as
            :func:`myext.cross_entropy`'s; never read on the host.
        shift: scores the hidden state at position ``t`` of the batch shape's last
            dimension (a sequence ``T``) against target ``t + shift`` and drops the last
            ``shift`` positions: a causal language model passes its hidden states
            ``(B, T, H)`` and input ids ``(B, T)`` as they are, ``shift=1``. The rows
            of the input are read where they are (no copy).
        temperature: divides the (capped) logits before the softmax; > 0.
        lse_square_scale: the z-loss: adds ``lse_square_scale * lse**2`` to the loss of
            each element not ignored, before the reduction.
        softcap: caps the logits at ``softcap * tanh(logits / softcap)`` before the
            softmax; ``None`` (default) leaves them.
        chunk_size: rows per chunk; ``None`` chooses from the shapes (chunks of at
            most about 32 MiB of logits, :func:`default_chunk_size`). Results do not
            depend on it beyond rounding.
        accum_dtype: the dtype the weight gradient is summed in over the chunks.
            ``None`` (default): float32 for a bfloat16 or float16 input, a
            ``C x H`` accumulator twice the gradient's size. The input's own dtype sums
            into the gradient itself, with no accumulator: the least memory, at a rounding
            of the running sum per chunk (about 2.5x the default's largest error, see
            docs/NUMERICS.md), as Liger-Kernel and cut-cross-entropy do by default. The
            loss and the other gradients are unaffected.
        return_lse: also return each element's log-sum-exp, from the same pass.
        return_accuracy: also return the token accuracy (class-index targets).
        return_logprob: also return each element's log-probability of its target,
            differentiable, from the same pass (0 where ignored).
        return_entropy: also return the entropy of each element's softmax,
            differentiable, from the same pass (0 where ignored). Backpropagating
            through either makes each chunk's logits once more in backward.
        backend: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``; ``None`` picks
            ``$MYEXT_BACKEND`` or the best backend available for the tensors' device.
        vocab_parallel: the classes are split across the ranks of a process group
            (:class:`myext.distributed.VocabParallel`), as a tensor-parallel output
            layer is: ``linear_weight`` and ``linear_bias`` are this rank's rows
            ``[start, stop)``, ``input`` and class-index targets the same on every rank,
            probability targets this rank's columns, ``weight`` this rank's or every
            class's. The loss, lse and accuracy are those over every class, the same on
            every rank; backward gives this rank's slices of the weight and bias
            gradients and the input's whole gradient (an all_reduce over the ranks).
            Forward makes each chunk's logits once and backward once more (the gradient
            needs every rank's statistics first); no logits are gathered. A DTensor
            ``linear_weight`` that is ``Shard(0)`` on a 1-d mesh (the output layer of
            ``ColwiseParallel``) needs no ``vocab_parallel``: the split is the DTensor's,
            its bias ``Shard(0)`` too, the input and target plain or ``Replicate``.

    Returns:
        The loss, a scalar or for ``reduction="none"`` of the input's batch shape; with
        any ``return_*`` flag, a :class:`CrossEntropyOutput`.

    Example::

        >>> hidden, head = torch.randn(2, 16, 64), torch.nn.Linear(64, 1000)
        >>> labels = torch.randint(0, 1000, (2, 16))
        >>> loss = myext.linear_cross_entropy(hidden, head.weight, labels, linear_bias=head.bias)
        >>> torch.allclose(loss, F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten()))
        True
    """
    if ignore_index is None:
        ignore_index = -100
    if is_dtensor(linear_weight):
        mesh = linear_weight.device_mesh
        linear_weight, vocab_parallel = from_dtensor(linear_weight, 0)
        input, target = to_local(input, mesh, "input"), to_local(target, mesh, "target")
        linear_bias, weight = to_local(linear_bias, mesh, "linear_bias"), to_local(weight, mesh, "weight")
        sample_weight = to_local(sample_weight, mesh, "sample_weight")
    if vocab_parallel is not None:
        weight = shard_weight(weight, vocab_parallel)
    probabilities = check_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index,
                                               reduction, label_smoothing, lse_square_scale, softcap, chunk_size,
                                               temperature, accum_dtype)
    want = (Extras(return_lse, return_accuracy, return_logprob, return_entropy)
            if return_lse or return_accuracy or return_logprob or return_entropy else NO_EXTRAS)
    head = linear_weight.dim() > 2
    if sample_weight is not None or normalizer is not None or shift or want.logprob:
        if head and (sample_weight is not None or shift):
            raise ValueError("sample_weight and shift are not available with a K-dimensional head (linear_weight of "
                             "more than two dimensions)")
        check_lm_options(sample_weight, normalizer, shift, reduction, tuple(input.shape[:-1]), probabilities, input,
                         want)
    if (want.logprob or want.entropy) and (head or transforms_active()):
        raise NotImplementedError("return_logprob and return_entropy are available in reverse-mode autograd for a "
                                  "head (C, H): not with forward-mode AD, torch.func's transforms or a "
                                  "K-dimensional head")
    classes = linear_weight.shape[0]
    target, name = plan(NAME, backend, input.device, target, probabilities, ignore_index, classes, vocab_parallel,
                        "linear_weight's rows", return_accuracy)
    lm = None
    if sample_weight is not None or normalizer is not None or shift:
        lm = plan_lm(target, sample_weight, normalizer, shift, reduction, ignore_index)
        target, sample_weight = lm.target, lm.sample_weight
    options = Options.of(lm.reduction if lm is not None else reduction, ignore_index, label_smoothing,
                         lse_square_scale, softcap, temperature, want.entropy)
    if head:
        if vocab_parallel is not None:
            raise ValueError("vocab_parallel is not available with a K-dimensional head (linear_weight of more "
                             "than two dimensions)")
        loss, row_max, row_log_sum, target_logit, target_2d = _positions_loss(
            input, linear_weight, linear_bias, target, weight, options, chunk_size, accum_dtype, name, want.rows,
            probabilities)
        rows = (row_max, row_log_sum, target_logit, None, None)
        batch_shape = target.shape if not probabilities else target.shape[:1] + target.shape[2:]
    else:
        batch_shape = input.shape[:-1]
        sample_rows = sample_weight
        if input.dim() == 2:  # rows already, and the checked target too: no views made on every call
            input_2d, target_2d = input, target
        else:
            count = math.prod(batch_shape)
            input_2d = input.reshape(count, input.shape[-1])
            target_2d = target.reshape(count, classes) if probabilities else target.reshape(count)
            sample_rows = sample_weight.reshape(count) if sample_weight is not None else None
        chunk = chunk_size or default_chunk_size(input_2d.shape[0], classes, input.dtype, input.device)
        loss, rows = _rows_loss(input_2d, linear_weight, linear_bias, target_2d, weight, sample_rows, options, chunk,
                                accum_dtype, name, vocab_parallel, want)
    result = finish(loss, rows, target_2d, options, batch_shape, want)
    return finish_lm(result, lm, reduction, target_2d, weight, ignore_index) if lm is not None else result


def _rows_loss(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
               target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
               options: Options, chunk: int, accum_dtype: Optional[torch.dtype], name: str,
               vocab_parallel: Optional[VocabParallel], want: Extras):
    """The loss of rows (R, H) through the head (C, H) on the backend ``name``, and where
    ``want`` asks for extras (else possibly None) the rows' (max, log-sum, target logit,
    log-probability, entropy)."""
    rows = None
    if vocab_parallel is not None and name == "torch":
        logits = affine(replicated(input, vocab_parallel.group), linear_weight, linear_bias)
        loss = vocab_parallel_reference(logits, target, weight, options, vocab_parallel, sample_weight)
        if want.rows:
            with torch.no_grad():
                found = combine_shards(
                    shard_logit_statistics(logits, target, weight, options, vocab_parallel, name), target,
                    options, vocab_parallel)
            rows = (found.row_max, found.row_log_sum, found.target_logit,
                    *vocab_parallel_extras_reference(logits, target, options, vocab_parallel))
    elif vocab_parallel is not None:
        loss, *rows = VocabParallelLinearCrossEntropyFunction.apply(
            input, linear_weight, linear_bias, target, weight, sample_weight, options, chunk, accum_dtype,
            vocab_parallel, name)
    elif name == "torch":
        logits = affine(input, linear_weight, linear_bias)
        loss = options.reference(logits, target, weight, sample_weight)
        if want.rows:
            rows = (*reference_rows(logits, target, options), *reference_logprob_entropy(logits, target, options))
    elif not needs_grad(input, linear_weight, linear_bias, target):
        loss, row_max, row_log_sum, target_logit, _, row_entropy, *_ = op("linear_cross_entropy_forward", name)(
            input, linear_weight, linear_bias, target, weight, sample_weight, *options.args, chunk,
            [False, False, False], accum_dtype)
        if want.rows:
            logprob = (row_logprob(row_max, row_log_sum, target_logit, target, options.ignore_index)
                       if want.logprob else None)
            rows = (row_max, row_log_sum, target_logit, logprob, row_entropy)
    elif transforms_active():
        loss, row_max, row_log_sum, target_logit, *_ = LinearCrossEntropyJvpFunction.apply(
            input, linear_weight, linear_bias, target, weight, sample_weight, options, chunk, accum_dtype, name)
        rows = (row_max, row_log_sum, target_logit, None, None)
    elif want.rows:
        loss, *rows = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight,
                                                       sample_weight, options, chunk, accum_dtype, name)
    else:
        loss = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, sample_weight,
                                                options, chunk, accum_dtype, name, False)
    return loss, rows


def _positions_loss(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                    target: torch.Tensor, weight: Optional[torch.Tensor], options: Options,
                    chunk_size: Optional[int], accum_dtype: Optional[torch.dtype], name: str, want_rows: bool,
                    probabilities: bool):
    """The loss of a K-dimensional head: ``linear_weight`` (C, d1, ..., dk, H) makes the
    logits (N, C, d1, ..., dk) of F.cross_entropy's K-dimensional form, and each position
    p of (d1, ..., dk) is a head (C, H) of its own over the same rows of ``input``. So
    each runs as a loss of rows (``'none'``, or ``'sum'`` whose sums are added, and
    divided for ``'mean'`` by the summed weight of every position's targets), its head
    a strided view, nothing copied. Returns the loss, each (row, position)'s statistics
    (where wanted) and targets in the order (N, d1, ..., dk)."""
    rows, classes, features = input.shape[0], linear_weight.shape[0], linear_weight.shape[-1]
    count = math.prod(linear_weight.shape[1:-1])
    heads = linear_weight.reshape(classes, count, features)
    biases = linear_bias.reshape(classes, count) if linear_bias is not None else None
    targets = target.reshape(rows, classes, count) if probabilities else target.reshape(rows, count)
    each = dataclasses.replace(options, reduction=REDUCTIONS["none" if options.reduction == REDUCTIONS["none"]
                                                             else "sum"])
    chunk = chunk_size or default_chunk_size(rows, classes, input.dtype, input.device)
    wanted = Extras(lse=want_rows)
    parts = []
    for p in range(count):
        part, statistics = _rows_loss(input, heads[:, p], biases[:, p] if biases is not None else None,
                                      targets[..., p], weight, None, each, chunk, accum_dtype, name, None, wanted)
        parts.append((part, *(statistics[:3] if statistics is not None else (None, None, None))))
    # Position-minor, as the rows of the logits (N, C, d1, ..., dk) are.
    by_row = [torch.stack(column, dim=1).reshape(-1) if want_rows else None for column in list(zip(*parts))[1:]]
    target_rows = (targets.movedim(1, -1).reshape(rows * count, classes) if probabilities
                   else targets.reshape(-1))
    if options.reduction == REDUCTIONS["none"]:
        loss = torch.stack([part[0] for part in parts], dim=1)
    else:
        acc = acc_dtype(input.dtype)
        loss = torch.stack([part[0].to(acc) for part in parts]).sum()
        if options.reduction == REDUCTIONS["mean"]:
            loss = loss / _mean_divisor(target_rows, weight, options.ignore_index, probabilities, acc)
        loss = loss.to(input.dtype)
    return (loss, *by_row, target_rows)


def _mean_divisor(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, probabilities: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """The ``'mean'`` divisor of rows: their number for probabilities, else the summed
    class weight of the targets not ignored (0 gives nan, as PyTorch's)."""
    if probabilities:
        return torch.tensor(float(target.shape[0]), dtype=dtype, device=target.device)
    kept = target != ignore_index
    if weight is None:
        return kept.sum().to(dtype)
    return torch.where(kept, weight.to(dtype)[torch.where(kept, target, 0)], 0.0).sum()


# --------------------------------------------------------------------------- the spec

def reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """linear_cross_entropy's loss, from elementary torch ops: cross_entropy's reference
    of the logits ``input @ linear_weight.T + linear_bias``, held whole (for a
    K-dimensional head, of the logits (N, C, d1, ..., dk) it makes); the executable
    spec. ``shift`` is slicing here (rows ``[..., :T - shift, :]`` against target
    ``[..., shift:]``), ``normalizer`` a division of the sum; ``chunk_size`` changes
    nothing."""
    ignore_index = -100 if ignore_index is None else ignore_index
    if linear_weight.dim() > 2:
        loss = ce.reference(_head_logits(affine, input, linear_weight, linear_bias), target, weight, ignore_index,
                            "sum" if normalizer is not None else reduction, label_smoothing,
                            temperature=temperature, lse_square_scale=lse_square_scale, softcap=softcap)
        return loss / normalizer if normalizer is not None else loss
    if shift:
        input = input[..., :input.shape[-2] - shift, :]
        target, sample_weight = (t[..., shift:] if t is not None else None for t in (target, sample_weight))
    rows_reduction = "sum" if normalizer is not None else reduction
    loss = _loss_of_rows(
        lambda logits, rows_target: cross_entropy_2d(
            logits, rows_target, weight, ignore_index, rows_reduction, float(label_smoothing), lse_square_scale,
            softcap, temperature, sample_weight.reshape(-1) if sample_weight is not None else None),
        affine(input, linear_weight, linear_bias), target, rows_reduction)
    return loss / normalizer if normalizer is not None else loss


def baseline(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    sample_weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    shift: int = 0,
    temperature: float = 1.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """What PyTorch itself computes: cross_entropy's baseline (F.cross_entropy, with
    torch.tanh's cap and logsumexp's z-loss) of F.linear's logits, the shift as slicing."""
    ignore_index = -100 if ignore_index is None else ignore_index
    options = dict(temperature=temperature, lse_square_scale=lse_square_scale, softcap=softcap,
                   normalizer=normalizer)
    if linear_weight.dim() > 2:
        return ce.baseline(_head_logits(F.linear, input, linear_weight, linear_bias), target, weight, ignore_index,
                           reduction, label_smoothing, **options)
    if shift:
        input = input[..., :input.shape[-2] - shift, :]
        target, sample_weight = (t[..., shift:] if t is not None else None for t in (target, sample_weight))
    rows_weight = sample_weight.reshape(-1) if sample_weight is not None else None
    return _loss_of_rows(
        lambda logits, rows_target: ce.baseline(logits, rows_target, weight, ignore_index, reduction,
                                                label_smoothing, sample_weight=rows_weight, **options),
        F.linear(input, linear_weight, linear_bias), target, reduction)


def _head_logits(linear, input: torch.Tensor, linear_weight: torch.Tensor,
                 linear_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The logits (N, C, d1, ..., dk) of a K-dimensional head (C, d1, ..., dk, H), from
    ``linear`` (affine or F.linear) over its rows flattened, as F.linear_cross_entropy
    makes them."""
    flat = linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]),
                  linear_bias.reshape(-1) if linear_bias is not None else None)
    return flat.reshape(input.shape[0], *linear_weight.shape[:-1])


def _loss_of_rows(loss_of_rows, logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """``loss_of_rows`` of logits ``(*, C)`` and their target (``(*)`` or ``(*, C)``) as
    rows; for reduction none, the losses back in the batch shape ``(*)``."""
    batch, classes = logits.shape[:-1], logits.shape[-1]
    rows = math.prod(batch)
    rows_target = target.reshape(rows, classes) if target.is_floating_point() else target.reshape(rows)
    loss = loss_of_rows(logits.reshape(rows, classes), rows_target)
    return loss.reshape(batch) if reduction == "none" else loss


def _sample(batch: tuple[int, ...], features: int, classes: int, device: str, *, kind: str = "class",
            bias: bool = True, weighted: bool = False, scale: float = 1.0, positions: tuple[int, ...] = (),
            **options: Any) -> registry.Sample:
    """Input ``(*batch, features)``, a (classes, *positions, features) weight scaled so
    that the logits have about ``scale``'s spread, a bias, and a target: class indices
    with the second ignored, or probabilities that require grad (of the K-dimensional
    form (N, C, *positions) for a head with ``positions``)."""
    x = torch.randn(*batch, features, dtype=torch.float64, device=device).requires_grad_()
    w = (torch.randn(classes, *positions, features, dtype=torch.float64, device=device) * scale
         / math.sqrt(features))
    w.requires_grad_()
    kwargs = dict(options)
    if bias:
        kwargs["linear_bias"] = torch.randn(classes, *positions, dtype=torch.float64, device=device).requires_grad_()
    if kind == "class":
        target = torch.randint(0, classes, (*batch, *positions), device=device)
        if target.numel() > 1:
            target.view(-1)[1] = options.get("ignore_index", -100)
    else:
        shape, dim = ((*batch, classes, *positions), len(batch)) if positions else ((*batch, classes), -1)
        target = torch.softmax(torch.randn(*shape, dtype=torch.float64, device=device), dim=dim)
        target.requires_grad_()
    if weighted:
        kwargs["weight"] = torch.rand(classes, dtype=torch.float64, device=device).add(0.5)
    head = f"->{classes}" + (f"x{positions}" if positions else "")
    described = [f"{tuple(batch)}x{features}{head} {kind}"] + (["no bias"] if not bias else [])
    described += (["weighted"] if weighted else []) + [f"{k}={v}" for k, v in options.items()]
    return registry.Sample((x, w, target), kwargs, name=", ".join(described))


def samples(device: str) -> list[registry.Sample]:
    """1-d, 2-d and 3-d inputs, with and without bias, each target kind, weights,
    smoothing, z-loss, soft-capping, every reduction and K-dimensional heads, most in two chunks (more chunks
    cost the interpreted Triton kernels time; test_linear_cross_entropy.py varies them)."""
    return [
        _sample((), 4, 5, device),
        _sample((5,), 4, 6, device, weighted=True, label_smoothing=0.2, chunk_size=3),
        _sample((2, 3), 4, 5, device, bias=False, reduction="none", chunk_size=4),
        _sample((5,), 3, 6, device, weighted=True, reduction="sum", ignore_index=-1, chunk_size=3),
        _sample((4,), 3, 5, device, kind="prob", label_smoothing=0.1, chunk_size=3),
        _sample((2, 2), 3, 5, device, kind="prob", weighted=True, reduction="none"),
        _sample((6,), 4, 5, device, weighted=True, scale=4.0, label_smoothing=0.1, lse_square_scale=0.1,
                softcap=3.0, chunk_size=4),
        _sample((2, 3), 4, 5, device, kind="prob", scale=4.0, lse_square_scale=0.2, softcap=2.0, reduction="sum",
                chunk_size=4),
        _sample((3,), 4, 5, device, positions=(2,), weighted=True, label_smoothing=0.1, chunk_size=2),
        _sample((2,), 3, 4, device, kind="prob", positions=(2, 1), reduction="none", softcap=2.0),
        *lm_samples(device),
    ]


def _with(sample: registry.Sample, described: str, **kwargs: Any) -> registry.Sample:
    """``sample`` with more keyword arguments, named with ``described`` added."""
    return registry.Sample(sample.args, {**sample.kwargs, **kwargs}, name=sample.name + described)


def lm_samples(device: str) -> list[registry.Sample]:
    """A language model's options: per-token weights (one sample differentiates them),
    shift, temperature over a soft cap, and the exact normalizer (a 0-d tensor)."""

    def weights(*shape):
        return torch.rand(*shape, dtype=torch.float64, device=device).add(0.5)

    weighted = _sample((2, 4), 3, 5, device, shift=1, temperature=0.7, softcap=3.0, chunk_size=4)
    weighted = _with(weighted, ", sample_weight", sample_weight=weights(2, 4))
    learned = _sample((2, 3), 3, 5, device, kind="class", reduction="none", temperature=1.5, chunk_size=4)
    learned = _with(learned, ", sample_weight that requires grad",
                    sample_weight=weights(2, 3).requires_grad_())
    normalized = _sample((2, 3), 3, 5, device, weighted=True, shift=2, chunk_size=4)
    normalized = _with(normalized, ", normalizer", normalizer=torch.tensor(5.0, dtype=torch.float64, device=device))
    prob = _sample((4,), 3, 5, device, kind="prob", temperature=2.0, chunk_size=3)
    prob = _with(prob, ", sample_weight", sample_weight=weights(4))
    return [weighted, learned, normalized, prob]


def accuracy_samples(device: str) -> list[registry.Sample]:
    """Logits of spread 3 over more classes than a chunk of rows, N-d, both target
    kinds, a K-dimensional head."""
    return [
        _sample((64,), 32, 100, device, weighted=True, scale=3.0, ignore_index=-1, label_smoothing=0.1,
                chunk_size=16),
        _sample((3, 17), 24, 70, device, scale=3.0, reduction="none", chunk_size=20),
        _sample((37,), 16, 60, device, kind="prob", weighted=True, scale=3.0, reduction="sum"),
        _sample((40,), 32, 300, device, weighted=True, scale=30.0, label_smoothing=0.1, lse_square_scale=1e-3,
                softcap=15.0, chunk_size=8),
        _sample((33,), 16, 50, device, positions=(3,), weighted=True, scale=3.0, chunk_size=8),
    ]


def eager(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The PyTorch baseline of myext.linear_cross_entropy: the logits, then the loss."""
    return F.cross_entropy(F.linear(input, linear_weight), target)


def auto_chunked() -> Callable[..., torch.Tensor]:
    """``eager`` compiled with Inductor's auto-chunker, which splits a training graph's
    rows at a GEMM that amplifies its inputs (here the logits), so that forward and
    backward run chunk by chunk without the whole logits. Only where there is a
    backward: a forward-only graph is not chunked. The options belong to this compiled
    function alone, never to the global config, so ``compile`` stays plain.

    The amplification threshold is lowered from 8 to 1: the chunker divides the logits'
    size by that of both GEMM operands, the weight included, which is 3.5 for a language
    model's head (N=4096, H=1024, V=32000), so at its default it leaves the head whole
    and this is ``compile`` again. Logits under a million elements stay unchunked."""
    return torch.compile(eager, options={"auto_chunker.enable": True, "auto_chunker.amplify_ratio_threshold": 1})


def cut_cross_entropy() -> Callable[..., torch.Tensor]:
    """Apple's cut-cross-entropy (an optional package), its torch.compile implementation,
    the one that runs on the CPU: the logits, upcast to float32, then F.cross_entropy.
    Its conventions are given explicitly, those of ``eager``: no shift, mean over the
    targets, -100 ignored."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        raise registry.Unavailable("cut-cross-entropy not installed: pip install cut-cross-entropy") from None
    return lambda input, linear_weight, target: cce(input, linear_weight, target, ignore_index=-100, reduction="mean",
                                                    shift=False, impl="torch_compile")


def benchmark_inputs(N: int, H: int, V: int, *, device: torch.device | str, dtype: torch.dtype,
                     requires_grad: bool) -> dict[str, torch.Tensor]:
    """A language model's last layer: hidden states, a head initialised like nn.Linear's
    and class-index targets."""
    bound = 1.0 / math.sqrt(H)
    return {
        "input": torch.randn(N, H, device=device, dtype=dtype).requires_grad_(requires_grad),
        "linear_weight": torch.empty(V, H, device=device, dtype=dtype).uniform_(-bound, bound)
        .requires_grad_(requires_grad),
        "target": torch.randint(0, V, (N,), device=device),
    }


def work(shape, backward: bool, dtype: torch.dtype) -> tuple[float, str]:
    """FLOPs: the logits' GEMM, 2NHV; with backward the input and weight gradients' too."""
    flops = 2 * shape["N"] * shape["H"] * shape["V"]
    return (3 * flops if backward else flops), "GFLOP/s"


SPEC = registry.register(registry.OpSpec(
    name=NAME,
    function=linear_cross_entropy,
    reference=reference,
    baseline=baseline,
    dispatcher_ops=("linear_cross_entropy_forward", "linear_cross_entropy_backward"),
    always_run=("linear_cross_entropy_forward",),
    fakes={"linear_cross_entropy_forward": linear_cross_entropy_forward_fake,
           "linear_cross_entropy_backward": linear_cross_entropy_backward_fake,
           "linear_cross_entropy_shard_backward": linear_cross_entropy_shard_backward_fake},
    capabilities={SHARD_BACKWARD: "linear_cross_entropy_shard_backward"},
    samples=samples,
    accuracy_samples=accuracy_samples,
    benchmark=registry.Benchmark(
        # A language model's head: 4096 tokens of hidden size 1024 over 32000 classes
        # (524 MB of float32 logits), and a small classifier.
        sweep=[("N=4096, H=1024", [dict(N=4096, H=1024, V=v) for v in (1000, 8192, 32000)])],
        quick_sweep=[("N=64, H=32", [dict(N=64, H=32, V=v) for v in (10, 100)])],
        cases=[dict(N=4096, H=1024, V=32000), dict(N=256, H=784, V=10)],
        gpu_sweep=[("N=16384, H=4096", [dict(N=16384, H=4096, V=v) for v in (32000, 128256)])],
        x="V",
        inputs=benchmark_inputs,
        eager=eager,
        work=work,
        label=lambda shape: f"{shape['N']}x{shape['H']}->{shape['V']}",
        alternatives={
            "compile-autochunk": registry.Alternative(auto_chunked, compiled=True),
            "cut-cross-entropy": registry.Alternative(cut_cross_entropy, compiled=True),
        },
    ),
))
