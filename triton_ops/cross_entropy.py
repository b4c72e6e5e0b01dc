"""Cross-entropy in Triton: an online softmax over blocks of each row.

A program handles one row, in blocks of up to MAX_BLOCK_C classes; rows shorter
than that are stacked, several to a program, into tiles of about that size.

With q the target distribution after label smoothing (q = (1 - eps) target + eps / C,
target one-hot for class indices) and w the class weights (ones if none):

    loss = sum(w q (max - x)) + sum(w q) log_sum,    grad = scale * (sum(w q) * softmax(x) - w q),

where log_sum = log(sum(exp(x - max))). Every term of sum(w q (max - x)) is >= 0, so
the loss has no cancellation for logits of any size; forward keeps max and log_sum
apart for backward, whose softmax exp((x - max) - log_sum) is then as precise.

Forward reads each row once: every block updates the running max, the sum of
exponentials and the weighted sums the loss needs. It writes the loss, the row's max
and log_sum, and its weight in the mean; torch ops on the device then reduce those,
with no sync to the host. Backward writes the gradient in one sweep over the row; for
probability targets, and for class targets with both weights and smoothing, a first
pass sums w q over the target and weights, without the logits. The backward of a shard
of the classes (vocabulary parallelism) is the same sweep over the shard's columns,
given the whole rows' max, log_sum and sum(w q).

The logits x enter as z = cap(x) / temperature, and all of the above is of z. Sample
weights scale each row's loss and its share of the mean's divisor. Forward may also
write each row's softmax entropy, from the same pass; backward may add the gradients
of the rows' target log-probs and entropies, given theirs from upstream.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._host import (check, check_floating, check_like, check_optional_rows, check_optional_vector, check_shape,
                    wrap_triton)
from ._loss_options import LossOptions

# The most elements a program loads at a time: 16 KB of float32, eight per thread
# of 16 warps. Tests lower it to run rows of many blocks cheaply.
MAX_BLOCK_C = 4096

@triton.jit
def _kahan_expm1(u, v):
    """exp(v) - 1 from u = exp(v), v <= 0 (or within rounding of it): Kahan's
    (u - 1) v / log(u) where u - 1 cancels, u - 1 itself below u = 1/2.

    Kahan's correction holds only while log(u) recovers v, that is while u is a normal
    number: an exponential that underflows to a subnormal keeps a few bits, and its log
    strays from v by up to the subnormal's relative spacing (a percent at 1e-321), so
    would the result. Below 1/2, u - 1 has no cancellation: rounding u and the
    subtraction cost at most an ulp of the result, and u is never subnormal there.
    (The log is taken of a stand-in where the branch is unused.)"""
    kahan = (u >= 0.5) & (u != 1.0)
    safe_u = tl.where(kahan, u, 0.5)
    return tl.where(u == 1.0, v, tl.where(kahan, (safe_u - 1.0) * v / tl.log(safe_u), u - 1.0))


if INTERPRETED:
    @triton.jit
    def _tanh(x):
        """tanh from exp and log alone (the interpreter has no libdevice), in float64 and
        rounded once: -m / (2 + m) with m = expm1(-2|x|), expm1 by Kahan's
        (u - 1) v / log(u), u = exp(v), exact where u - 1 cancels."""
        v = -2.0 * tl.abs(x.to(tl.float64))
        u = tl.exp(v)
        m = _kahan_expm1(u, v)
        t = -m / (2.0 + m)
        return tl.where(x < 0, -t, t).to(x.dtype)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)


@triton.jit
def _expm1(v):
    """exp(v) - 1 without its cancellation near v = 0."""
    return _kahan_expm1(tl.exp(v), v)


@triton.jit
def _cap(x, cap, SOFTCAP: tl.constexpr):
    """cap * tanh(x / cap) where SOFTCAP, else x."""
    if SOFTCAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _logit(x, cap, temperature, SOFTCAP: tl.constexpr, TEMPERATURE: tl.constexpr):
    """z = cap(x) / temperature, the logit every loss term is of."""
    x = _cap(x, cap, SOFTCAP)
    if TEMPERATURE:
        x = x / temperature
    return x


@triton.jit
def _cross_entropy_forward_kernel(
    x_ptr, target_ptr, weight_ptr, sample_weight_ptr, loss_ptr, max_ptr, log_sum_ptr, target_logit_ptr,
    row_weight_ptr, entropy_ptr,
    rows, classes, ignore_index, label_smoothing: tl.float64, lse_square_scale: tl.float64, softcap: tl.float64,
    temperature: tl.float64,
    stride_xr, stride_xc, stride_tr, stride_tc,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, TEMPERATURE: tl.constexpr, ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For BLOCK_R rows r of x (R, C), capped to softcap * tanh(x / softcap) where SOFTCAP
    and divided by the temperature where TEMPERATURE, z: loss[r] (with the z-loss
    lse_square_scale * lse^2 where Z_LOSS; times the sample weight s[r] where
    HAS_SAMPLE_WEIGHT), the row's max[r] and log_sum[r] of z, the target's z
    target_logit[r], row_weight[r], the row's part of the mean's divisor, and where
    ENTROPY the softmax's entropy[r]. The outputs' dtype is the one computed in."""
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Rows past the end repeat the last one: loads need no row mask, stores do.
    row = tl.minimum(row_ids, rows - 1).to(tl.int64)
    acc_dtype = max_ptr.dtype.element_ty
    # label_smoothing is annotated float64: a Python float otherwise reaches the kernel
    # as float32, and float64 results would carry float32's rounding of it.
    eps = (tl.zeros((), tl.float64) + label_smoothing).to(acc_dtype)
    cap = (tl.zeros((), tl.float64) + softcap).to(acc_dtype)
    temp = (tl.zeros((), tl.float64) + temperature).to(acc_dtype)
    x_rows = x_ptr + row[:, None] * stride_xr
    cols = tl.arange(0, BLOCK_C)[None, :]

    running_max = tl.full((BLOCK_R,), float("-inf"), acc_dtype)
    sum_exp = tl.zeros((BLOCK_R,), acc_dtype)
    # sum(exp(z - max) (max - z)): every term >= 0, so the entropy log(sum_exp) +
    # gap_exp / sum_exp has no cancellation, where lse - sum(p z) would lose its digits.
    gap_exp = tl.zeros((BLOCK_R,), acc_dtype)
    # Per lane, sum(w q) and sum(w q (running_max - x)); for class targets q is here
    # only its smoothing part eps / C, the target's part is added after the loop.
    lanes_wq = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
    lanes_gap = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
    for start in range(0, classes, BLOCK_C):
        offs = start + cols
        inside = offs < classes
        x = tl.load(x_rows + offs * stride_xc, mask=inside, other=float("-inf")).to(acc_dtype)
        x = tl.where(inside, _logit(x, cap, temp, SOFTCAP, TEMPERATURE), float("-inf"))
        # tl.max passes over NaN: a NaN logit is looked for, and makes the row NaN.
        has_nan = tl.max(tl.where(x != x, 1, 0), axis=1) > 0
        new_max = tl.maximum(running_max, tl.max(x, axis=1), propagate_nan=tl.PropagateNan.ALL)
        new_max = tl.where(has_nan, float("nan"), new_max)
        # Until a finite logit is seen, shift by 0: exp(-inf - -inf) would be nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        exps = tl.exp(x - shift[:, None])
        if ENTROPY:
            # A larger max adds sum_exp times its rise to every earlier gap. The gaps are
            # taken as 0 where they would be inf times a zero weight (a max of -inf, a
            # logit of -inf), which would make nan.
            rise = tl.where(running_max == float("-inf"), 0.0, shift - running_max)
            gaps = tl.where(x == float("-inf"), 0.0, shift[:, None] - x)
            gap_exp = (gap_exp + sum_exp * rise) * rescale + tl.sum(exps * gaps, axis=1)
        sum_exp = sum_exp * rescale + tl.sum(exps, axis=1)
        if PROB_TARGET or SMOOTHING:
            q = eps / classes
            if PROB_TARGET:
                p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
                q += (1 - eps) * p.to(acc_dtype)
            if HAS_WEIGHT:
                q *= tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
            wq = tl.where(inside, q, 0.0)
            # The lanes' earlier gaps move up with the max. (From a max of -inf every
            # logit seen was -inf, its gap already +inf.)
            grows = (new_max != running_max) & (running_max != float("-inf"))
            lanes_gap += lanes_wq * tl.where(grows, new_max - running_max, 0.0)[:, None]
            # A -inf logit is +inf below any max, also below a max of -inf.
            gap = tl.where(x == float("-inf"), float("inf"), new_max[:, None] - x)
            lanes_gap += wq * tl.where(inside, gap, 0.0)
            lanes_wq += wq
        running_max = new_max
    log_sum = tl.log(sum_exp)

    loss = tl.zeros((BLOCK_R,), acc_dtype)
    if PROB_TARGET or SMOOTHING:
        loss = tl.sum(lanes_gap, axis=1) + tl.sum(lanes_wq, axis=1) * log_sum
    if PROB_TARGET:
        row_weight = tl.full((BLOCK_R,), 1.0, acc_dtype)
    else:
        target = tl.load(target_ptr + row * stride_tr)
        kept = target != ignore_index
        # The host asserts the class indices; should one be out of range anyway, it
        # reads nothing and makes the row NaN.
        valid = kept & (target >= 0) & (target < classes)
        x_target = tl.load(x_ptr + row * stride_xr + target * stride_xc, mask=valid, other=float("nan"))
        z_target = _logit(x_target.to(acc_dtype), cap, temp, SOFTCAP, TEMPERATURE)
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target, mask=valid, other=float("nan")).to(acc_dtype)
        else:
            w_target = tl.where(valid, 1.0, float("nan")).to(acc_dtype)
        loss += (1 - eps) * w_target * ((running_max - z_target) + log_sum)
    if Z_LOSS:
        lse = running_max + log_sum
        loss += (tl.zeros((), tl.float64) + lse_square_scale).to(acc_dtype) * lse * lse
    if ENTROPY:
        entropy = log_sum + gap_exp / sum_exp
    if HAS_SAMPLE_WEIGHT:
        sample_weight = tl.load(sample_weight_ptr + row).to(acc_dtype)
        loss *= sample_weight
    if PROB_TARGET:
        target_logit = tl.zeros((BLOCK_R,), acc_dtype)
        if HAS_SAMPLE_WEIGHT:
            row_weight = sample_weight
    else:
        if HAS_SAMPLE_WEIGHT:
            w_target *= sample_weight
        loss = tl.where(kept, loss, 0.0)
        row_weight = tl.where(kept, w_target, 0.0)
        target_logit = tl.where(kept, z_target, 0.0)
        if ENTROPY:
            entropy = tl.where(kept, entropy, 0.0)
    stored = row_ids < rows
    tl.store(loss_ptr + row, loss, mask=stored)
    tl.store(max_ptr + row, running_max, mask=stored)
    tl.store(log_sum_ptr + row, log_sum, mask=stored)
    tl.store(target_logit_ptr + row, target_logit, mask=stored)
    tl.store(row_weight_ptr + row, row_weight, mask=stored)
    if ENTROPY:
        tl.store(entropy_ptr + row, entropy, mask=stored)


@triton.jit
def _cross_entropy_backward_kernel(
    grad_ptr, x_ptr, target_ptr, weight_ptr, sample_weight_ptr, max_ptr, log_sum_ptr, scale_ptr, row_weight_ptr,
    weight_sum_ptr, grad_logprob_ptr, grad_entropy_ptr, entropy_ptr,
    rows, columns, classes, class_start, ignore_index, label_smoothing: tl.float64, lse_square_scale: tl.float64,
    softcap: tl.float64, temperature: tl.float64,
    stride_gr, stride_xr, stride_xc, stride_tr, stride_tc, stride_scale,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, TEMPERATURE: tl.constexpr, GRAD_LOGPROB: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr, SHARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows r of grad (R, C), unit column stride: scale[r] s[r] ((sum(w q) + 2
    lambda lse) softmax(z[r]) - w q) with z the capped logits over the temperature and s
    the sample weights (ones unless HAS_SAMPLE_WEIGHT), plus where GRAD_LOGPROB
    grad_logprob[r] (onehot(t) - softmax) and where GRAD_ENTROPY grad_entropy[r] times
    the entropy's gradient -softmax (z - E), E = lse - entropy[r]; times dz/dx.

    Without SHARD the rows are whole (columns == classes, class_start 0). With SHARD
    they hold the columns of classes [class_start, class_start + columns) of all
    `classes`, and what the other columns add comes in: max and log_sum are those of
    the whole rows, row_weight[r] is row r's sum(w q) over every class and
    weight_sum[0] the sum of every class's weight. Class indices index every class."""
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = tl.minimum(row_ids, rows - 1).to(tl.int64)
    acc_dtype = max_ptr.dtype.element_ty
    eps = (tl.zeros((), tl.float64) + label_smoothing).to(acc_dtype)
    cap = (tl.zeros((), tl.float64) + softcap).to(acc_dtype)
    temp = (tl.zeros((), tl.float64) + temperature).to(acc_dtype)
    x_rows = x_ptr + row[:, None] * stride_xr
    grad_rows = grad_ptr + row[:, None] * stride_gr
    cols = tl.arange(0, BLOCK_C)[None, :]
    row_max = tl.load(max_ptr + row)[:, None]
    log_sum = tl.load(log_sum_ptr + row)[:, None]
    scale = tl.load(scale_ptr + row * stride_scale).to(acc_dtype)
    # The sample weight scales the loss's gradient alone, not the extras'.
    if HAS_SAMPLE_WEIGHT:
        scale *= tl.load(sample_weight_ptr + row).to(acc_dtype)
    if GRAD_LOGPROB:
        grad_logprob = tl.load(grad_logprob_ptr + row).to(acc_dtype)
    if GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + row).to(acc_dtype)
        # z - E = (z - max) + (entropy - log_sum): two differences of nearby numbers,
        # where z - (lse - entropy) would lose the digits lse and entropy share.
        entropy_gap = tl.load(entropy_ptr + row).to(acc_dtype)[:, None] - log_sum

    # sum(w q), needed before the first block: summed over the row first unless
    # it is known (q's smoothing part is eps / C, so sum(q) = eps without weights).
    # A shard holds only some of its terms: the sum over every class comes in.
    if SHARD:
        sum_wq = tl.load(row_weight_ptr + row).to(acc_dtype)
    elif PROB_TARGET or (SMOOTHING and HAS_WEIGHT):
        lanes_wq = tl.zeros((BLOCK_R, BLOCK_C), acc_dtype)
        for start in range(0, columns, BLOCK_C):
            offs = start + cols
            inside = offs < columns
            q = eps / classes
            if PROB_TARGET:
                p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
                q += (1 - eps) * p.to(acc_dtype)
            if HAS_WEIGHT:
                lanes_wq += q * tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
            else:
                lanes_wq += tl.where(inside, q, 0.0)
        sum_wq = tl.sum(lanes_wq, axis=1)
    else:
        sum_wq = tl.zeros((BLOCK_R,), acc_dtype) + eps
    # For class targets so far only the smoothing part of sum(w q): kept apart, as the
    # target's own gradient below needs it. (A shard's is eps / C times every weight.)
    if SHARD:
        smoothing_wq = tl.zeros((BLOCK_R,), acc_dtype) + eps / classes * tl.load(weight_sum_ptr).to(acc_dtype)
    else:
        smoothing_wq = sum_wq
    if not PROB_TARGET:
        target = tl.load(target_ptr + row * stride_tr)
        kept = target != ignore_index
        valid = kept & (target >= 0) & (target < classes)
        if SHARD:
            # The target's column in the shard. A row whose target another shard holds
            # gets no target term here: -1 matches no column.
            target = target - class_start
            held = valid & (target >= 0) & (target < columns)
            target = tl.where(held, target, -1)
            # An ignored row's row_weight takes no part, as its target's weight does not.
            sum_wq = tl.where(kept, sum_wq, 0.0)
        else:
            held = valid
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target, mask=held, other=0.0).to(acc_dtype)
        else:
            w_target = tl.full((BLOCK_R,), 1.0, acc_dtype)
        if not SHARD:
            sum_wq += (1 - eps) * w_target
        # Ignored rows get zeros, even where scale is nan (a mean over no weight); as
        # in forward, an index out of range makes the row NaN.
        scale = tl.where(kept, scale, 0.0)
        scale = tl.where(kept & ~valid, float("nan"), scale)
        if GRAD_LOGPROB:
            grad_logprob = tl.where(kept, grad_logprob, 0.0)
        if GRAD_ENTROPY:
            grad_entropy = tl.where(kept, grad_entropy, 0.0)
        target = target[:, None]
        w_target = w_target[:, None]
        smoothing_wq = smoothing_wq[:, None]
    # The z-loss's coefficient of the softmax, 2 lambda lse.
    z_coef = tl.zeros((BLOCK_R, 1), acc_dtype)
    if Z_LOSS:
        z_coef += 2 * (tl.zeros((), tl.float64) + lse_square_scale).to(acc_dtype) * (row_max + log_sum)
    sum_wq = sum_wq[:, None]
    scale = scale[:, None]
    if GRAD_LOGPROB:
        grad_logprob = grad_logprob[:, None]
    if GRAD_ENTROPY:
        grad_entropy = grad_entropy[:, None]

    for start in range(0, columns, BLOCK_C):
        offs = start + cols
        inside = offs < columns
        # Lanes past the row get softmax 0 (and no overflow warnings in the interpreter).
        x_raw = tl.load(x_rows + offs * stride_xc, mask=inside, other=float("-inf")).to(acc_dtype)
        x = tl.where(inside, _logit(x_raw, cap, temp, SOFTCAP, TEMPERATURE), float("-inf"))
        if PROB_TARGET:
            p = tl.load(target_ptr + row[:, None] * stride_tr + offs * stride_tc, mask=inside, other=0.0)
            q = (1 - eps) * p.to(acc_dtype) + eps / classes
            if HAS_WEIGHT:
                q *= tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
        elif SMOOTHING:
            q = tl.where(offs == target, (1 - eps) + eps / classes, eps / classes)
            if HAS_WEIGHT:
                q *= tl.load(weight_ptr + offs, mask=inside, other=0.0).to(acc_dtype)
        else:
            # Only the target's weight: no other class weight (a NaN among them) takes part.
            q = tl.where(offs == target, w_target, 0.0)
        log_softmax = (x - row_max) - log_sum
        softmax = tl.exp(log_softmax)
        # The z-loss's term apart: folded into sum(w q) it would carry the rounding of
        # 1 + 2 lambda lse where the rest cancels to nearly 0.
        grad = scale * (sum_wq * softmax - q) + scale * z_coef * softmax
        if GRAD_LOGPROB:
            grad -= grad_logprob * softmax
        if GRAD_ENTROPY:
            # A class of softmax 0 adds 0, also where its z is -inf (its gap inf).
            gap = tl.where(softmax == 0, 0.0, (row_max - x) - entropy_gap)
            entropy_grad = grad_entropy * softmax * gap
            grad += entropy_grad
        if not PROB_TARGET:
            # The target's own, (1 - eps) w_t (p - 1) + s p - w_t eps / C + 2 lambda lse p
            # with s the smoothing part of sum(w q): grouped so that its terms cancel where
            # they should (p - 1 as expm1, exact near 1; a row of one class gets exactly 0).
            p_minus_1 = _expm1(log_softmax)
            own = (1 - eps) * w_target * p_minus_1 + z_coef * softmax
            if SMOOTHING:
                own += smoothing_wq * softmax - w_target * (eps / classes)
            own = scale * own
            # The log-prob's own term, (1 - p) grad_logprob, as the same p - 1.
            if GRAD_LOGPROB:
                own -= grad_logprob * p_minus_1
            if GRAD_ENTROPY:
                own += entropy_grad
            grad = tl.where(offs == target, own, grad)
        if SOFTCAP:
            # dz/dx = 1 / cosh^2(x / cap) = 4 e / (1 + e)^2, e = exp(-2 |x| / cap): 1 - tanh^2
            # would cancel to nothing where tanh is within rounding of 1.
            e = tl.exp(-2 * tl.abs(x_raw) / cap)
            grad *= 4 * e / ((1 + e) * (1 + e))
        if TEMPERATURE:
            grad /= temp
        tl.store(grad_rows + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside & (row_ids < rows)[:, None])


def _launch(kernel, *args, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
            sample_weight: Optional[torch.Tensor], label_smoothing: float, lse_square_scale: float, softcap: float,
            temperature: float, **flags: bool) -> None:
    """Launches one of the kernels over the rows of input, with tiles sized for its rows.
    It takes what the kernels take: ``args`` their arguments, the options among them as
    scalars (LossOptions.kernel_args), and by name the options that switch math on
    (LossOptions.switches); ``flags`` are the constexprs of that kernel alone."""
    rows, classes = input.shape
    block_c = min(triton.next_power_of_2(max(classes, 1)), MAX_BLOCK_C)
    block_r = min(triton.next_power_of_2(rows), MAX_BLOCK_C // block_c)
    # About eight elements per thread: wide loads with few registers.
    num_warps = max(1, min(16, block_r * block_c // 256))
    wrap_triton(kernel)[(triton.cdiv(rows, block_r),)](
        *args, PROB_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
        HAS_SAMPLE_WEIGHT=sample_weight is not None, SMOOTHING=label_smoothing > 0, Z_LOSS=lse_square_scale > 0,
        SOFTCAP=softcap > 0, TEMPERATURE=temperature != 1.0, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=num_warps, **flags)


def _target_strides(target: torch.Tensor) -> tuple[int, int]:
    return (target.stride(0), target.stride(1)) if target.dim() == 2 else (target.stride(0), 0)


def _check_inputs(op: str, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                  sample_weight: Optional[torch.Tensor], o: LossOptions,
                  shard: Optional[tuple[int, int]] = None) -> None:
    """The checks of csrc/cross_entropy.h; with ``shard`` = (class_start, classes), input
    holds the logits of classes [class_start, class_start + C_local) of ``classes``,
    which the class indices index."""
    check_floating(op, "input", input)
    check(input.dim() == 2, op, f"input must be 2-d, got shape {tuple(input.shape)}")
    rows, columns = input.shape
    classes = columns
    if shard is not None:
        class_start, classes = shard
        check_shard_range(op, class_start, columns, classes)
    check_targets(op, target, weight, rows, columns, input, o.ignore_index, index_classes=classes)
    check_optional_rows(op, "sample_weight", sample_weight, rows, input)
    o.check(op)


def check_shard_range(op: str, class_start: int, columns: int, classes: int) -> None:
    """A shard of ``columns`` classes from ``class_start`` on lies within ``classes``
    (csrc/cross_entropy.h's check_shard)."""
    check(0 <= class_start and 0 <= classes and class_start <= classes - columns, op,
          f"the shard's classes [class_start, class_start + {columns}) = [{class_start}, "
          f"{class_start + columns}) must lie within the {classes} classes")


def check_shard_rows(op: str, row_weight: torch.Tensor, weight_sum: torch.Tensor, rows: int,
                     ref: torch.Tensor) -> None:
    """A shard's row_weight (rows,) and weight_sum (0-d), floating, on the device of
    ``ref`` (the rest of csrc/cross_entropy.h's check_shard)."""
    for name, t, shape in (("row_weight", row_weight, (rows,)), ("weight_sum", weight_sum, ())):
        check_floating(op, name, t)
        check(t.device == ref.device, op, f"{name} is on {t.device} but input is on {ref.device}")
        check_shape(op, name, t, shape)


def check_targets(op: str, target: torch.Tensor, weight: Optional[torch.Tensor], rows: int, classes: int,
                  ref: torch.Tensor, ignore_index: int, index_classes: Optional[int] = None) -> None:
    """target (rows,) int64 or (rows, classes) probabilities, weight (classes) or None, of
    the dtype and device of ``ref`` (the logits, or the input they are computed from).
    Class indices, in [0, index_classes) (default ``classes``; a shard's rows index
    every class), are asserted on the device (no host sync): on a GPU an index out of
    range stops the kernels' stream."""
    check(target.device == ref.device, op, f"target is on {target.device} but input is on {ref.device}")
    if target.is_floating_point():
        check_like(op, "target", target, "input", ref)
        check_shape(op, "target (probabilities)", target, (rows, classes))
    else:
        check(target.dtype == torch.int64, op,
              f"target must hold int64 class indices or probabilities of the input's dtype, got {target.dtype}")
        check_shape(op, "target (class indices)", target, (rows,))
        if target.numel():
            bound = classes if index_classes is None else index_classes
            in_range = (target == ignore_index) | ((target >= 0) & (target < bound))
            torch._assert_async(in_range.all(), f"{op}: a class index is outside [0, {bound}) "
                                                f"and not ignore_index ({ignore_index})")
    check_optional_vector(op, "weight", weight, classes, ref)


def check_row_outputs(op: str, grad_loss: torch.Tensor, row_max: torch.Tensor, row_log_sum: torch.Tensor,
                      total_weight: torch.Tensor, rows: int, reduction: int, ref: torch.Tensor) -> None:
    """A forward op's row_max and row_log_sum (rows,) and total_weight (0-d), and
    grad_loss, (rows,) for reduction none, else 0-d; on the device of ``ref``."""
    for name, t in (("row_max", row_max), ("row_log_sum", row_log_sum)):
        check_floating(op, name, t)
        check(t.device == ref.device, op, f"{name} is on {t.device} but input is on {ref.device}")
        check_shape(op, name, t, (rows,))
    check_floating(op, "total_weight", total_weight)
    check_shape(op, "total_weight", total_weight, ())
    check_floating(op, "grad_loss", grad_loss)
    check(grad_loss.device == ref.device, op, f"grad_loss is on {grad_loss.device} but input is on {ref.device}")
    check_shape(op, "grad_loss (reduction none)" if reduction == 0 else "grad_loss (a reduced loss)", grad_loss,
                (rows,) if reduction == 0 else ())


def check_extras(op: str, grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                 row_entropy: Optional[torch.Tensor], target: torch.Tensor, rows: int, ref: torch.Tensor) -> None:
    """A backward's extras, each None or (rows,): the upstream gradients of the rows'
    target log-probs (class indices only) and entropies, and forward's row_entropy,
    which the entropy's gradient needs: given with grad_entropy and only with it."""
    for name, t in (("grad_logprob", grad_logprob), ("grad_entropy", grad_entropy), ("row_entropy", row_entropy)):
        check_optional_rows(op, name, t, rows, ref)
    check((grad_entropy is None) == (row_entropy is None), op,
          "grad_entropy and row_entropy must be given together, got "
          f"{'only grad_entropy' if row_entropy is None else 'only row_entropy'}")
    check(grad_logprob is None or not target.is_floating_point(), op,
          "grad_logprob needs class-index targets: probability targets have no target log-prob")


def mean_divisor(total_weight: torch.Tensor) -> torch.Tensor:
    """The mean's divisor, nan where it is 0 (a mean over no weight is nan, as in PyTorch)."""
    return torch.where(total_weight == 0, torch.full_like(total_weight, float("nan")), total_weight)


def reduce_rows(losses: torch.Tensor, row_weight: torch.Tensor, reduction: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' losses reduced (kept per row for reduction 0, else their mean (1) or sum
    (2)) in ``dtype``, and the mean's divisor, the rows' weights summed. Shared with the
    fused linear cross-entropy."""
    total_weight = row_weight.sum()
    if reduction == 0:
        loss = losses
    elif reduction == 2:
        loss = losses.sum()
    else:
        loss = losses.sum() / mean_divisor(total_weight)
    return loss.to(dtype), total_weight


def row_scale(grad_loss: torch.Tensor, total_weight: torch.Tensor, reduction: int, acc: torch.dtype) -> torch.Tensor:
    """The factor of each row: the upstream gradient, over the mean's divisor. Shared with
    the fused linear cross-entropy."""
    scale = grad_loss.to(acc)
    if reduction == 1:
        scale = scale / mean_divisor(total_weight.to(acc))
    return scale


def cross_entropy_forward(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
    reduction: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    temperature: float, entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C):
    the op myext::cross_entropy_forward_triton (see its schema in csrc/myext.cpp).

    Returns the loss (per row for reduction 0, else its mean (1) or sum (2)) in the
    input's dtype, each row's times its sample weight; each row's max and
    log(sum(exp(z - max))) of the logits z, capped and over the temperature; the
    target's z; the mean's divisor (the summed sample weights times the weights of the
    targets not ignored, or the summed sample weights, R without them); and each row's
    softmax entropy where ``entropy``, else an empty (0,); the last five in float32
    (float64 for float64 input).
    """
    op = "cross_entropy_forward_triton"
    o = LossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy)
    _check_inputs(op, input, target, weight, sample_weight, o)
    rows, classes = input.shape
    acc = torch.promote_types(input.dtype, torch.float32)  # float64 stays, the rest is float32
    losses, row_max, row_log_sum, target_logit, row_weight = (input.new_empty((rows,), dtype=acc) for _ in range(5))
    row_entropy = input.new_empty((rows if o.entropy else 0,), dtype=acc)
    forward_rows(input, target, weight, sample_weight, losses, row_max, row_log_sum, target_logit, row_weight,
                 row_entropy, o)
    loss, total_weight = reduce_rows(losses, row_weight, o.reduction, input.dtype)
    return loss, row_max, row_log_sum, target_logit, total_weight, row_entropy


def cross_entropy_backward(
    grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor], row_max: torch.Tensor, row_log_sum: torch.Tensor,
    total_weight: torch.Tensor, grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    row_entropy: Optional[torch.Tensor], reduction: int, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float, temperature: float, entropy: bool,
) -> torch.Tensor:
    """Gradient for the logits (R, C) of cross_entropy_forward's loss, given its gradient
    grad_loss and forward's row_max, row_log_sum and total_weight, plus those of the
    rows' target log-probs and entropies given their gradients grad_logprob and
    grad_entropy (with forward's row_entropy): the op myext::cross_entropy_backward_triton."""
    op = "cross_entropy_backward_triton"
    o = LossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy)
    _check_inputs(op, input, target, weight, sample_weight, o)
    rows, classes = input.shape
    check_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, rows, o.reduction, input)
    check_extras(op, grad_logprob, grad_entropy, row_entropy, target, rows, input)
    grad_input = torch.empty((rows, classes), dtype=input.dtype, device=input.device)
    acc = torch.promote_types(input.dtype, torch.float32)
    backward_rows(grad_input, input, target, weight, sample_weight, row_max, row_log_sum,
                  row_scale(grad_loss, total_weight, o.reduction, acc), grad_logprob, grad_entropy, row_entropy, o)
    return grad_input


def cross_entropy_shard_backward(
    grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor], row_max: torch.Tensor, row_log_sum: torch.Tensor,
    row_weight: torch.Tensor, total_weight: torch.Tensor, weight_sum: torch.Tensor,
    grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], row_entropy: Optional[torch.Tensor],
    reduction: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    temperature: float, entropy: bool, class_start: int, classes: int,
) -> torch.Tensor:
    """Gradient of the loss over all ``classes`` classes for a shard of them, the logits
    (R, C_local) of classes [class_start, class_start + C_local) (vocabulary parallelism):
    the op myext::cross_entropy_shard_backward_triton. target holds class indices into
    every class, or the shard's probabilities, weight the shard's class weights;
    row_max, row_log_sum and row_entropy are those of the whole rows, row_weight (R,)
    each row's sum(w q) over every class (without its sample weight) and weight_sum
    (0-d) the sum of every class's weight (C without weights); the rest as
    cross_entropy_backward's."""
    op = "cross_entropy_shard_backward_triton"
    o = LossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy)
    _check_inputs(op, input, target, weight, sample_weight, o, shard=(class_start, classes))
    rows, columns = input.shape
    check_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, rows, o.reduction, input)
    check_shard_rows(op, row_weight, weight_sum, rows, input)
    check_extras(op, grad_logprob, grad_entropy, row_entropy, target, rows, input)
    grad_input = torch.empty((rows, columns), dtype=input.dtype, device=input.device)
    acc = torch.promote_types(input.dtype, torch.float32)
    backward_rows(grad_input, input, target, weight, sample_weight, row_max, row_log_sum,
                  row_scale(grad_loss, total_weight, o.reduction, acc), grad_logprob, grad_entropy, row_entropy, o,
                  shard=(class_start, classes, row_weight, weight_sum))
    return grad_input


def forward_rows(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                 sample_weight: Optional[torch.Tensor], losses: torch.Tensor, row_max: torch.Tensor,
                 row_log_sum: torch.Tensor, target_logit: torch.Tensor, row_weight: torch.Tensor,
                 row_entropy: torch.Tensor, o: LossOptions) -> None:
    """The forward kernel over checked rows (R, C) of logits: each row's loss, max,
    log-sum, target logit, share of the mean's divisor and, where o.entropy, entropy
    into the (R,) outputs, all of the accumulation dtype (row_entropy is not written
    otherwise). Shared with the fused linear cross-entropy's chunks."""
    rows, classes = input.shape
    if rows == 0:
        return
    weight = weight.contiguous() if weight is not None else None
    sample_weight = sample_weight.contiguous() if sample_weight is not None else None
    # A pointer the options switch off is never read: the input stands in.
    _launch(_cross_entropy_forward_kernel, input, target, _or(weight, input), _or(sample_weight, input), losses,
            row_max, row_log_sum, target_logit, row_weight, row_entropy if o.entropy else losses, rows, classes,
            *o.kernel_args, *input.stride(), *_target_strides(target), input=input, target=target, weight=weight,
            sample_weight=sample_weight, **o.switches, ENTROPY=o.entropy)


def backward_rows(grad: torch.Tensor, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                  sample_weight: Optional[torch.Tensor], row_max: torch.Tensor, row_log_sum: torch.Tensor,
                  scale: torch.Tensor, grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                  row_entropy: Optional[torch.Tensor], o: LossOptions,
                  shard: Optional[tuple[int, int, torch.Tensor, torch.Tensor]] = None) -> None:
    """The backward kernel over checked rows (R, C): the logits' gradient, the loss's
    times ``scale`` (one per row, (R,), or one for all, 0-d) and the sample weights,
    plus the extras' (grad_entropy given with row_entropy), into ``grad`` (R, C), unit
    column stride, which may be ``input`` itself: each block of a row is read before it
    is written. With ``shard`` = (class_start, classes, row_weight, weight_sum) the rows
    hold the classes [class_start, class_start + C) of ``classes`` (see
    cross_entropy_shard_backward). Shared with the fused linear cross-entropy's chunks."""
    rows, columns = input.shape
    if rows == 0:
        return
    acc = torch.promote_types(input.dtype, torch.float32)
    row_max, row_log_sum = row_max.to(acc).contiguous(), row_log_sum.to(acc).contiguous()
    scale = scale.to(acc)
    weight = weight.contiguous() if weight is not None else None
    # The kernel converts them as it reads them, in any floating dtype.
    sample_weight, grad_logprob, grad_entropy, row_entropy = (
        t.contiguous() if t is not None else None for t in (sample_weight, grad_logprob, grad_entropy, row_entropy))
    if shard is not None:
        class_start, classes, row_weight, weight_sum = shard
        row_weight, weight_sum = row_weight.to(acc).contiguous(), weight_sum.to(acc)
    else:
        # Whole rows: scale stands in for the pointers the kernel then never reads.
        class_start, classes, row_weight, weight_sum = 0, columns, scale, scale
    _launch(_cross_entropy_backward_kernel, grad, input, target, _or(weight, input), _or(sample_weight, scale),
            row_max, row_log_sum, scale, row_weight, weight_sum, _or(grad_logprob, scale), _or(grad_entropy, scale),
            _or(row_entropy, scale), rows, columns, classes, class_start,
            *o.kernel_args, grad.stride(0), *input.stride(), *_target_strides(target),
            scale.stride(0) if scale.dim() else 0, input=input, target=target, weight=weight,
            sample_weight=sample_weight, **o.switches, SHARD=shard is not None,
            GRAD_LOGPROB=grad_logprob is not None, GRAD_ENTROPY=grad_entropy is not None)


def _or(tensor: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """``tensor``, or where it is None the tensor whose pointer the kernel gets instead and never reads."""
    return tensor if tensor is not None else stand_in
