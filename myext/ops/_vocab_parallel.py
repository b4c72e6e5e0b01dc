"""Vocabulary parallelism: the losses over every class of logits (or of a linear
layer's outputs) whose classes are split across the ranks of a process group
(:class:`myext.distributed.VocabParallel`), the logits never gathered.

Each rank runs its backend's forward kernel over its shard (``shard_forward`` plans
how), which gives each row's statistics over the shard; one combination over the ranks
(``combine_shards``: an all_reduce of a max, then one of sums) gives those of whole
rows and the loss; backward needs no collective beyond the input gradient's sum. The
plain-PyTorch reference (``vocab_parallel_reference``) is the spec and the ``"torch"``
backend. Reverse mode only: forward-mode AD and torch.func are refused.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from .._library import acc_dtype
from .._validation import REDUCTIONS
from ..backends import op
from ..distributed import VocabParallel, all_reduce_max, all_reduce_sum
from ._losses import (Options, capped, reduce_rows, reference_logprob_entropy, reference_rows, row_logprob,
                      target_grad_of, tempered)
from .linear_relu import affine

__all__ = ["VocabParallelCrossEntropyFunction", "VocabParallelLinearCrossEntropyFunction", "combine_shards",
           "shard_logit_statistics", "shard_weight", "vocab_parallel_extras_reference", "vocab_parallel_reference"]

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
    entropy: Optional[torch.Tensor] = None  # (R,) the entropy over every class, where asked (0 where ignored)


class ShardForward(NamedTuple):
    """How one rank's forward kernel runs over its columns (the shard's logits, or the
    linear layer's rows that make them) to give its rows' statistics: with ``target``
    and the options ``settings`` instead of the call's."""

    target: torch.Tensor                   # the kernel's target
    settings: tuple                        # the kernel's Options.args
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
        settings = (0, options.ignore_index, 0.0, 0.0, options.softcap, options.temperature, options.entropy)
        return ShardForward(q, settings, None, held_weight, weight_sum)
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
    settings = (0, -1, 1.0 if eps > 0 else 0.0, 0.0, options.softcap, options.temperature, options.entropy)
    return ShardForward(kernel_target, settings, holds, held_weight, weight_sum)


def shard_statistics(plan: ShardForward, kernel_out: Optional[tuple[torch.Tensor, ...]], rows: int,
                     columns: int) -> tuple[torch.Tensor, ...]:
    """One rank's part of :class:`ShardRows` from its forward kernel's (loss, row_max,
    row_log_sum, target_logit, row_entropy) as ``plan`` ran it (None for a shard of no
    columns).

    Returns (max, log_sum, gap, target_logit, held_weight, weight_sum, entropy): per row
    the max and log-sum of the shard's capped logits, the gap (see :func:`shard_forward`;
    v = w for class indices, w q for probabilities), the target's logit and weight where
    the shard holds the target (else 0; sum(w q) over the shard for probabilities), the
    shard's summed class weight, and where the plan asks the entropy of the shard's own
    softmax (else None).
    """
    acc = plan.held_weight.dtype
    if kernel_out is None:
        # No logits here: an empty sum of exponentials, whose log is -inf.
        empty = torch.zeros(rows, dtype=acc, device=plan.held_weight.device)
        return (torch.full_like(empty, -math.inf), empty, empty, empty, plan.held_weight, plan.weight_sum,
                empty if plan.settings[-1] else None)
    loss, row_max, row_log_sum, target_logit, row_entropy = kernel_out
    entropy = row_entropy if plan.settings[-1] else None
    if plan.holds is None:
        return row_max, row_log_sum, loss.to(acc), target_logit, plan.held_weight, plan.weight_sum, entropy
    return (row_max, row_log_sum, loss.to(acc) * columns, torch.where(plan.holds, target_logit, 0.0),
            plan.held_weight, plan.weight_sum, entropy)


def shard_logit_statistics(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                           options: Options, shard: VocabParallel, backend: str) -> tuple[torch.Tensor, ...]:
    """:func:`shard_statistics` of a shard's logits (R, C_local), from the backend's
    cross-entropy forward kernel (for ``"torch"``, torch ops)."""
    rows, columns = input.shape
    plan = shard_forward(target, weight, columns, options, shard, input.dtype)
    kernel_out = None
    if columns and backend == "torch":
        kernel_options = Options(*plan.settings)
        with torch.no_grad():
            kernel_out = (kernel_options.reference(input, plan.target, weight),
                          *reference_rows(input, plan.target, kernel_options),
                          reference_logprob_entropy(input, plan.target, kernel_options)[1])
    elif columns:
        loss, row_max, row_log_sum, target_logit, _, row_entropy = op("cross_entropy_forward", backend)(
            input, plan.target, weight, None, *plan.settings)
        kernel_out = (loss, row_max, row_log_sum, target_logit, row_entropy)
    return shard_statistics(plan, kernel_out, rows, columns)


def combine_shards(statistics: tuple[torch.Tensor, ...], target: torch.Tensor, options: Options,
                   shard: VocabParallel, sample_weight: Optional[torch.Tensor] = None) -> ShardRows:
    """Every rank's :func:`shard_statistics` combined into :class:`ShardRows`: an
    all_reduce (max) of one number per row, then one (sum) of four, and the loss of
    each row over every class from them, times its ``sample_weight`` where given."""
    row_max, row_log_sum, gap, target_logit, held_weight, weight_sum, entropy = statistics
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
    share = torch.exp(lse_r - shift)
    terms = [share, shard_gap, target_logit, held_weight]
    if entropy is not None:
        # The whole row's entropy sum_c p_c (lse - z_c) is, over the shards, sum_s
        # e^(lse_s - lse) (H_s + lse - lse_s), H_s the entropy of shard s's own softmax:
        # terms >= 0, summed with the shift (the global max) standing in for lse.
        terms.append(torch.where(share > 0, share * (entropy + (shift - lse_r)), 0.0))
    rowwise = torch.stack(terms)
    summed = all_reduce_sum(torch.cat([rowwise.flatten(), weight_sum.reshape(1)]), shard.group)
    sum_exp, total_gap, target_logit, held_weight, *entropy_part = summed[:-1].view(len(terms), -1)
    total_class_weight = summed[-1]
    log_sum = torch.log(sum_exp)
    entropy = entropy_part[0] / sum_exp + log_sum if entropy_part else None
    lse = shift + log_sum
    z_loss = options.lse_square_scale * lse * lse if options.lse_square_scale else 0.0
    if probabilities:
        # sum(w q (lse - z)) = sum(w q (shift - z)) + sum(w q) log_sum.
        loss = total_gap + held_weight * log_sum + z_loss
        row_weight = held_weight
        if sample_weight is not None:
            s = sample_weight.to(loss.dtype)
            loss, total_weight = loss * s, s.sum()
        else:
            total_weight = torch.tensor(float(target.shape[0]), dtype=loss.dtype, device=loss.device)
    else:
        kept = target != options.ignore_index
        loss = (1.0 - eps) * held_weight * ((shift - target_logit) + log_sum) + z_loss
        if eps > 0:
            loss = loss + eps / classes * (total_gap + total_class_weight * log_sum)
        row_weight = (1.0 - eps) * held_weight + eps / classes * total_class_weight
        weight_share = held_weight
        if sample_weight is not None:
            s = sample_weight.to(loss.dtype)
            loss, weight_share = loss * s, weight_share * s
        loss = torch.where(kept, loss, 0.0)
        total_weight = torch.where(kept, weight_share, 0.0).sum()
        entropy = torch.where(kept, entropy, 0.0) if entropy is not None else None
    return ShardRows(loss, shift, log_sum, target_logit, row_weight, total_weight, total_class_weight, entropy)


def shard_target_grad(grad_loss: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                      sample_weight: Optional[torch.Tensor], rows: ShardRows, options: Options) -> torch.Tensor:
    """The gradient for a shard's probability targets: -(1 - eps) w_c (z_c - lse) times
    the row's upstream gradient and weight (divided by the 'mean' divisor)."""
    z = tempered(capped(input.to(rows.row_max.dtype), options.softcap or None), options.temperature)
    logp = z - (rows.row_max + rows.row_log_sum).unsqueeze(1)
    return target_grad_of(grad_loss, logp, weight, options, sample_weight, rows.total_weight).to(input.dtype)


def shard_input_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                     weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor], rows: ShardRows,
                     options: Options, shard: VocabParallel, backend: str, grad_logprob: Optional[torch.Tensor],
                     grad_entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient of the loss (and of the log-probabilities and entropies, for their
    upstream gradients) over every class w.r.t. a shard's logits."""
    if input.shape[1] == 0:
        return torch.zeros_like(input)
    return op("cross_entropy_shard_backward", backend)(
        grad_loss, input, target, weight, sample_weight, rows.row_max, rows.row_log_sum, rows.row_weight,
        rows.total_weight, rows.weight_sum, grad_logprob, grad_entropy,
        rows.entropy if grad_entropy is not None else None, *options.args, shard.start, shard.classes)


def _outputs(ctx: Any, loss: torch.Tensor, rows: ShardRows, target: torch.Tensor, options: Options) -> tuple:
    """A vocabulary-parallel Function's outputs: the loss, the rows' statistics (not
    differentiable), each row's log-probability of its target (class indices) and its
    entropy (where asked), as :class:`~myext.ops.cross_entropy.CrossEntropyFunction`'s."""
    ctx.mark_non_differentiable(rows.row_max, rows.row_log_sum, rows.target_logit)
    ctx.set_materialize_grads(False)  # as CrossEntropyFunction's
    logprob = (None if target.is_floating_point()
               else row_logprob(rows.row_max, rows.row_log_sum, rows.target_logit, target, options.ignore_index))
    entropy = rows.entropy.clone() if rows.entropy is not None else None  # an output of its own, not a saved one
    return loss, rows.row_max, rows.row_log_sum, rows.target_logit, logprob, entropy


def _upstream(grad_loss: Optional[torch.Tensor], rows: ShardRows, options: Options) -> torch.Tensor:
    """The loss's upstream gradient, zeros where only the extras took part."""
    if grad_loss is not None:
        return grad_loss
    return rows.loss.new_zeros(rows.loss.shape if options.reduction == REDUCTIONS["none"] else ())


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy over every class of logits split by classes across ranks.

    ``apply(input, target, weight, sample_weight, options, shard, backend)``: this rank's logits
    ``(R, C_local)`` of classes ``[shard.start, shard.stop)``, class indices ``(R,)``
    into every class or the shard's probabilities ``(R, C_local)``, the shard's class
    weights. Returns the loss (the same on every rank) and, not differentiable, each
    row's max and log-sum over every class and the target's logit. Backward needs no
    collective: it computes this shard's gradient from the saved per-row numbers.
    Differentiable once.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                sample_weight: Optional[torch.Tensor], options: Options, shard: VocabParallel, backend: str):
        rows = combine_shards(shard_logit_statistics(input, target, weight, options, shard, backend), target, options,
                              shard, sample_weight)
        ctx.save_for_backward(input, target, weight, sample_weight, *rows)
        ctx.options, ctx.shard, ctx.backend = options, shard, backend
        loss = reduce_rows(rows.loss, rows.total_weight, options.reduction, input.dtype)
        return _outputs(ctx, loss, rows, target, options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], _grad_max=None, _grad_log_sum=None,
                 _grad_target_logit=None, grad_logprob=None, grad_entropy=None):
        if grad_loss is None and grad_logprob is None and grad_entropy is None:
            return (None,) * len(ctx.needs_input_grad)  # no output took part in what is differentiated
        input, target, weight, sample_weight, *saved = ctx.saved_tensors
        rows = ShardRows(*saved)
        grad_input = grad_target = None
        if ctx.needs_input_grad[1] and grad_loss is not None:
            grad_target = shard_target_grad(grad_loss, input, weight, sample_weight, rows, ctx.options)
        if ctx.needs_input_grad[0]:
            grad_input = shard_input_grad(_upstream(grad_loss, rows, ctx.options), input, target, weight,
                                          sample_weight, rows, ctx.options, ctx.shard, ctx.backend, grad_logprob,
                                          grad_entropy)
        return grad_input, grad_target, None, None, None, None, None


def vocab_parallel_reference(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                             options: Options, shard: VocabParallel,
                             sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    z = tempered(capped(input, options.softcap or None), options.temperature)
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
        if sample_weight is not None:
            losses, divisor = losses * sample_weight.to(acc), sample_weight.to(acc).sum()
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
        if sample_weight is not None:
            losses, w_target = losses * sample_weight.to(acc), w_target * sample_weight.to(acc)
        losses = torch.where(kept, losses, 0.0)
        divisor = torch.where(kept, w_target, 0.0).sum()
    if options.reduction == REDUCTIONS["none"]:
        return losses.to(out_dtype)
    total = losses.sum()
    return (total / divisor if options.reduction == REDUCTIONS["mean"] else total).to(out_dtype)


def vocab_parallel_extras_reference(input: torch.Tensor, target: torch.Tensor, options: Options,
                                    shard: VocabParallel) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Each row's log-probability of its class-index target (None for probabilities) and
    entropy over every class, of a shard's logits (R, C_local), from torch ops and
    differentiable all_reduce sums, as :func:`vocab_parallel_reference` makes the loss:
    0 for ignored rows; a class of probability 0 adds 0 to the entropy."""
    acc = acc_dtype(input.dtype)
    input = input.to(acc)
    rows, columns = input.shape
    kept = None if target.is_floating_point() else target != options.ignore_index
    if kept is not None:
        input = torch.where(kept.unsqueeze(1), input, torch.zeros_like(input))
    z = tempered(capped(input, options.softcap or None), options.temperature)
    local_max = z.amax(dim=1) if columns else z.new_full((rows,), -math.inf)
    # Each sum over the classes is one over this shard's, all-reduced before anything
    # else takes part (as vocab_parallel_reference's terms), so that its backward on
    # this rank, the identity, is right: with m the max (a shift, not differentiated),
    # H = log S + B / S, S = sum e^(z - m) and B = sum e^(z - m) (m - z), both >= 0.
    m = all_reduce_max(local_max, shard.group).detach()
    m = torch.where(m == -math.inf, 0.0, m)
    u = z - m.unsqueeze(1)
    e = u.exp()
    sum_exp = all_reduce_sum(e.sum(dim=1), shard.group)
    gaps = all_reduce_sum(torch.where(e > 0, e * torch.where(e > 0, -u, 0.0), 0.0).sum(dim=1), shard.group)
    lse = m + torch.log(sum_exp)
    # NaN without a finite log-sum-exp, as the single-process reference's.
    entropy = torch.where(lse.isfinite(), torch.log(sum_exp) + gaps / sum_exp, math.nan)
    if kept is None:
        return None, entropy
    local = target - shard.start
    holds = kept & (local >= 0) & (local < columns)
    safe = local.clamp(0, max(columns - 1, 0)).unsqueeze(1)
    z_target = all_reduce_sum(torch.where(holds, z.gather(1, safe).squeeze(1) if columns else 0.0, 0.0), shard.group)
    return torch.where(kept, z_target - lse, 0.0), torch.where(kept, entropy, 0.0)


def shard_weight(weight: Optional[torch.Tensor], shard: VocabParallel) -> Optional[torch.Tensor]:
    """The shard's class weights from ``weight``: the shard's own ``(stop - start)`` or
    every class's ``(C)``."""
    if weight is not None and weight.dim() == 1 and weight.shape[0] == shard.classes != shard.size:
        return weight[shard.start:shard.stop]
    return weight


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy over every class of ``input @ linear_weight.T + linear_bias`` whose
    output rows (the classes) are split across ranks.

    ``apply(input, linear_weight, linear_bias, target, weight, sample_weight, options,
    chunk_size, accum_dtype, shard, backend)``: rows ``(R, H)`` (the same on every rank), this rank's rows
    ``[shard.start, shard.stop)`` of the linear weight and bias, class indices into
    every class or the shard's probabilities, the shard's class weights. Forward runs
    the fused forward op over the shard (each chunk's logits one GEMM, reduced to the
    rows' statistics as shard_forward plans), and one
    combination over the ranks (combine_shards) gives the loss. Backward, the fused
    shard backward op: each chunk's logits again, turned into their gradient with the
    whole rows' statistics, and the gradients accumulated; the input's, summed over the
    ranks by an all_reduce, is that of the whole problem. Differentiable on
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                options: Options, chunk_size: int, accum_dtype: Optional[torch.dtype], shard, backend: str):
        rows, columns = input.shape[0], linear_weight.shape[0]
        plan = shard_forward(target, weight, columns, options, shard, input.dtype)
        kernel_out = None
        if columns:
            loss, row_max, row_log_sum, target_logit, _, row_entropy, *_ = op("linear_cross_entropy_forward", backend)(
                input, linear_weight, linear_bias, plan.target, weight, None, *plan.settings, chunk_size,
                [False, False, False])
            kernel_out = (loss, row_max, row_log_sum, target_logit, row_entropy)
        found = combine_shards(shard_statistics(plan, kernel_out, rows, columns), target, options, shard,
                               sample_weight)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, sample_weight, *found)
        ctx.options, ctx.chunk_size, ctx.accum_dtype, ctx.shard, ctx.backend = (options, chunk_size, accum_dtype,
                                                                                shard, backend)
        loss = reduce_rows(found.loss, found.total_weight, options.reduction, input.dtype)
        return _outputs(ctx, loss, found, target, options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], _grad_max=None, _grad_log_sum=None,
                 _grad_target_logit=None, grad_logprob=None, grad_entropy=None):
        if grad_loss is None and grad_logprob is None and grad_entropy is None:
            return (None,) * len(ctx.needs_input_grad)  # no output took part in what is differentiated
        input, linear_weight, linear_bias, target, weight, sample_weight, *saved = ctx.saved_tensors
        found, options, shard = ShardRows(*saved), ctx.options, ctx.shard
        mask = [bool(ctx.needs_input_grad[i]) for i in range(3)]
        grad_target = None
        if ctx.needs_input_grad[3] and target.is_floating_point() and grad_loss is not None:
            # The size of the logits, as the unsharded op's: from the shard's logits whole.
            grad_target = shard_target_grad(grad_loss, affine(input, linear_weight, linear_bias), weight,
                                            sample_weight, found, options)
        if linear_weight.shape[0]:
            grad_input, grad_weight, grad_bias = op("linear_cross_entropy_shard_backward", ctx.backend)(
                _upstream(grad_loss, found, options), input, linear_weight, linear_bias, target, weight,
                sample_weight, found.row_max, found.row_log_sum, found.row_weight, found.total_weight,
                found.weight_sum, grad_logprob, grad_entropy, found.entropy if grad_entropy is not None else None,
                *options.args, shard.start, shard.classes, ctx.chunk_size, mask, ctx.accum_dtype)
        else:
            grad_input = torch.zeros_like(input) if mask[0] else None
            grad_weight = torch.zeros_like(linear_weight) if mask[1] else None
            grad_bias = torch.zeros_like(linear_bias) if mask[2] and linear_bias is not None else None
        if grad_input is not None:
            torch.distributed.all_reduce(grad_input, group=shard.group)
        return (grad_input, grad_weight, grad_bias, grad_target) + (None,) * (len(ctx.needs_input_grad) - 4)
