"""Fused linear cross-entropy for ``backend="triton"``: the host functions of the ops
``myext::linear_cross_entropy_forward_triton``, ``..._backward_triton`` and
``..._shard_backward_triton`` (schemas in csrc/myext.cpp).

The loop of the C++ ops (csrc/linear_cross_entropy.h): the rows go in chunks; each
chunk's logits are one GEMM (``torch.mm``: cuBLAS on a GPU) into a chunk-sized buffer,
which the Triton cross-entropy kernels of :mod:`myext_triton_ops.cross_entropy` read and,
where gradients are wanted, overwrite with the logits' gradient; the gradient GEMMs
then read it. The logits are never held whole. No step reads a value on the host.
The backward of a shard of the classes (vocabulary parallelism) is the same loop over
the shard's rows of the linear layer, with the cross-entropy shard backward's rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import cross_entropy as ce
from ._host import check, check_floating, check_like, check_optional_rows, check_optional_vector
from ._loss_options import LinearLossOptions

# As csrc/linear_cross_entropy.h: a chunk's logits take at most about this many bytes,
# or this many rows where that is more (up to 1/8 of the rows).
CHUNK_BYTES = 32 << 20
FULL_SPEED_ROWS = 256
# Classes per block of a weight gradient accumulated from a temporary product.
WEIGHT_GRAD_BLOCK = 2048


def chunk_rows(rows: int, classes: int, element_size: int, requested: int) -> int:
    """Rows per chunk: ``requested`` where > 0, else from the shapes (as the C++ ops)."""
    if requested > 0:
        return max(1, min(requested, rows))
    fit = CHUNK_BYTES // max(1, classes * element_size)
    most = max(1, min(rows, max(fit, min(FULL_SPEED_ROWS, rows // 8))))
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))  # the rows shared equally among the chunks


def _check_inputs(op: str, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                  target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                  o: LinearLossOptions, shard: Optional[tuple[int, int]] = None) -> None:
    """The checks of csrc/linear_cross_entropy.h; class indices are asserted on the
    device, as by the cross-entropy ops. With ``shard`` = (class_start, classes) the
    layer's rows are classes [class_start, class_start + C_local) of ``classes``
    (check_shard's extent, checked before the class indices, which index every class)."""
    check_floating(op, "input", input)
    check(input.dim() == 2, op, f"input must be 2-d, got shape {tuple(input.shape)}")
    check_like(op, "linear_weight", linear_weight, "input", input)
    check(linear_weight.dim() == 2 and linear_weight.shape[1] == input.shape[1], op,
          f"linear_weight must have shape (classes, {input.shape[1]}), the input's features last, "
          f"got {tuple(linear_weight.shape)}")
    classes = linear_weight.shape[0]
    check_optional_vector(op, "linear_bias", linear_bias, classes, input)
    index_classes = None
    if shard is not None:
        class_start, index_classes = shard
        ce.check_shard_range(op, class_start, classes, index_classes)
    ce.check_targets(op, target, weight, input.shape[0], classes, input, o.ignore_index,
                     index_classes=index_classes)
    check_optional_rows(op, "sample_weight", sample_weight, input.shape[0], input)
    o.check(op)
    acc = torch.promote_types(input.dtype, torch.float32)
    check(o.accum_dtype in (None, acc, input.dtype), op,
          f"accum_dtype must be None, {acc} or the input's dtype {input.dtype}, got {o.accum_dtype}")


def _divisor_before(target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                    ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean's divisor before the first chunk, on the device: the summed weights of
    the class targets not ignored, or the number of rows for probabilities; each row's
    times its sample weight."""
    if target.is_floating_point():
        if sample_weight is not None:
            return sample_weight.to(dtype).sum()
        return torch.tensor(float(target.shape[0]), dtype=dtype, device=target.device)
    kept = target != ignore_index
    if weight is None and sample_weight is None:
        return kept.sum().to(dtype)
    row_weight = weight.to(dtype)[torch.where(kept, target, 0)] if weight is not None else None
    if sample_weight is not None:
        s = sample_weight.to(dtype)
        row_weight = s if row_weight is None else row_weight * s
    return torch.where(kept, row_weight, 0).sum()


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def _grad_buffers(input: torch.Tensor, linear_weight: torch.Tensor, mask: Sequence[bool], o: LinearLossOptions):
    """The accumulators: the input's gradient in its dtype, the weight's in float32 for
    half-precision input unless ``o.accum_dtype`` says, the bias's in float64."""
    acc = o.accum_dtype or torch.promote_types(input.dtype, torch.float32)
    return (torch.empty_like(input) if mask[0] else None,
            torch.zeros(linear_weight.shape, dtype=acc, device=input.device) if mask[1] else None,
            torch.zeros(linear_weight.shape[0], dtype=torch.float64, device=input.device) if mask[2] else None)


def _accumulate(grads, grad_logits: torch.Tensor, x: torch.Tensor, w: torch.Tensor, begin: int) -> None:
    """Adds one chunk's share to each gradient in ``grads`` (input, weight, bias)."""
    grad_input, grad_weight, grad_bias = grads
    if grad_input is not None:
        torch.mm(grad_logits, w, out=grad_input[begin:begin + grad_logits.shape[0]])
    if grad_weight is not None:
        if grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), x)
        else:
            for start in range(0, grad_logits.shape[1], WEIGHT_GRAD_BLOCK):
                block = grad_logits[:, start:start + WEIGHT_GRAD_BLOCK]
                grad_weight[start:start + block.shape[1]] += block.t() @ x
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=torch.float64)


def _finish(grads, dtype: torch.dtype):
    return tuple(g.to(dtype) if g is not None else None for g in grads)


def linear_cross_entropy_forward(
    input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor], reduction: int, ignore_index: int,
    label_smoothing: float, lse_square_scale: float, softcap: float, temperature: float, entropy: bool,
    chunk_size: int, grad_mask: Sequence[bool], accum_dtype: Optional[torch.dtype] = None,
):
    """cross_entropy_forward of ``input @ linear_weight.T + linear_bias``, in chunks of
    rows; for reduction mean or sum also the gradients ``grad_mask`` asks for (for an
    upstream gradient of 1): the op myext::linear_cross_entropy_forward_triton."""
    op = "linear_cross_entropy_forward_triton"
    o = LinearLossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy,
                          chunk_size, accum_dtype)
    _check_inputs(op, input, linear_weight, linear_bias, target, weight, sample_weight, o)
    rows, classes = input.shape[0], linear_weight.shape[0]
    acc = torch.promote_types(input.dtype, torch.float32)
    losses, row_max, row_log_sum, target_logit, row_weight = (input.new_empty((rows,), dtype=acc) for _ in range(5))
    row_entropy = input.new_empty((rows if o.entropy else 0,), dtype=acc)
    sample_weight = _contiguous(sample_weight)
    with_grads = o.reduction != 0 and any(grad_mask)
    grads = _grad_buffers(input, linear_weight, grad_mask, o) if with_grads else (None, None, None)
    if with_grads:
        scale = torch.ones((), dtype=acc, device=input.device)
        if o.reduction == 1:
            scale = scale / ce.mean_divisor(_divisor_before(target, weight, sample_weight, o.ignore_index, acc))
    chunk = chunk_rows(rows, classes, input.element_size(), o.chunk_size)
    for begin in range(0, rows, chunk):
        end = min(rows, begin + chunk)
        x, t, s = input[begin:end], target[begin:end], _rows(sample_weight, begin, end)
        logits = _linear(x, linear_weight, linear_bias)
        ce.forward_rows(logits, t, weight, s, losses[begin:end], row_max[begin:end], row_log_sum[begin:end],
                        target_logit[begin:end], row_weight[begin:end],
                        row_entropy[begin:end], o)
        if with_grads:
            ce.backward_rows(logits, logits, t, weight, s, row_max[begin:end], row_log_sum[begin:end], scale,
                             None, None, None, o)
            _accumulate(grads, logits, x, linear_weight, begin)
    loss, total_weight = ce.reduce_rows(losses, row_weight, o.reduction, input.dtype)
    return (loss, row_max, row_log_sum, target_logit, total_weight, row_entropy, *_finish(grads, input.dtype))


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Made contiguous once, so that each chunk's rows are a contiguous view."""
    return tensor.contiguous() if tensor is not None else None


def _rows(tensor: Optional[torch.Tensor], begin: int, end: int) -> Optional[torch.Tensor]:
    return tensor[begin:end] if tensor is not None else None


def _backward_chunks(grad_loss: torch.Tensor, input: torch.Tensor, linear_weight: torch.Tensor,
                     linear_bias: Optional[torch.Tensor], target: torch.Tensor, weight: Optional[torch.Tensor],
                     sample_weight: Optional[torch.Tensor], row_max: torch.Tensor, row_log_sum: torch.Tensor,
                     total_weight: torch.Tensor, extras: tuple[Optional[torch.Tensor], ...],
                     o: LinearLossOptions, output_mask: Sequence[bool],
                     shard: Optional[tuple[int, int, torch.Tensor, torch.Tensor]] = None):
    """The backward loop over checked arguments: each chunk's logits again, turned into
    their gradient (with ``shard`` = (class_start, classes, row_weight, weight_sum) that
    of the loss over every class for the shard's columns, see ce.backward_rows), and the
    gradients that ``output_mask`` asks for accumulated. ``extras`` are (grad_logprob,
    grad_entropy, row_entropy), each None or (R,)."""
    if not any(output_mask):
        return None, None, None
    rows = input.shape[0]
    acc = torch.promote_types(input.dtype, torch.float32)
    scale = ce.row_scale(grad_loss, total_weight, o.reduction, acc)
    if shard is not None:
        # Converted once: each chunk's rows are then a contiguous view.
        class_start, classes, row_weight, weight_sum = shard
        row_weight = row_weight.to(acc).contiguous()
    sample_weight = _contiguous(sample_weight)
    extras = tuple(_contiguous(t) for t in extras)
    grads = _grad_buffers(input, linear_weight, output_mask, o)
    chunk = chunk_rows(rows, linear_weight.shape[0], input.element_size(), o.chunk_size)
    for begin in range(0, rows, chunk):
        end = min(rows, begin + chunk)
        x = input[begin:end]
        logits = _linear(x, linear_weight, linear_bias)
        ce.backward_rows(logits, logits, target[begin:end], weight, _rows(sample_weight, begin, end),
                         row_max[begin:end], row_log_sum[begin:end], scale[begin:end] if o.reduction == 0 else scale,
                         *(_rows(t, begin, end) for t in extras), o,
                         shard=None if shard is None else (class_start, classes, row_weight[begin:end], weight_sum))
        _accumulate(grads, logits, x, linear_weight, begin)
    return _finish(grads, input.dtype)


def linear_cross_entropy_backward(
    grad_loss: torch.Tensor, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
    target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
    row_max: torch.Tensor, row_log_sum: torch.Tensor, total_weight: torch.Tensor,
    grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], row_entropy: Optional[torch.Tensor],
    reduction: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    temperature: float, entropy: bool, chunk_size: int, output_mask: Sequence[bool],
    accum_dtype: Optional[torch.dtype] = None,
):
    """The gradients for (input, linear_weight, linear_bias) that ``output_mask`` asks
    for, each chunk's logits computed again: the op
    myext::linear_cross_entropy_backward_triton."""
    op = "linear_cross_entropy_backward_triton"
    o = LinearLossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy,
                          chunk_size, accum_dtype)
    _check_inputs(op, input, linear_weight, linear_bias, target, weight, sample_weight, o)
    rows = input.shape[0]
    ce.check_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, rows, o.reduction, input)
    ce.check_extras(op, grad_logprob, grad_entropy, row_entropy, target, rows, input)
    return _backward_chunks(grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight, row_max,
                            row_log_sum, total_weight, (grad_logprob, grad_entropy, row_entropy), o, output_mask)


def linear_cross_entropy_shard_backward(
    grad_loss: torch.Tensor, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
    target: torch.Tensor, weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
    row_max: torch.Tensor, row_log_sum: torch.Tensor, row_weight: torch.Tensor, total_weight: torch.Tensor,
    weight_sum: torch.Tensor, grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    row_entropy: Optional[torch.Tensor], reduction: int, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float, temperature: float, entropy: bool, class_start: int, classes: int,
    chunk_size: int, output_mask: Sequence[bool], accum_dtype: Optional[torch.dtype] = None,
):
    """linear_cross_entropy_backward for a shard of the classes (vocabulary parallelism):
    linear_weight and linear_bias hold rows [class_start, class_start + C_local) of an
    output layer of ``classes`` classes; target holds class indices into every class or
    the shard's probabilities, weight the shard's class weights; row_max, row_log_sum,
    row_entropy and row_weight (R,) are the whole rows' and weight_sum (0-d) every class's weight
    summed (as ce.cross_entropy_shard_backward's). grad_input is this shard's part of
    the input's gradient, which the caller sums over the shards: the op
    myext::linear_cross_entropy_shard_backward_triton."""
    op = "linear_cross_entropy_shard_backward_triton"
    o = LinearLossOptions(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy,
                          chunk_size, accum_dtype)
    _check_inputs(op, input, linear_weight, linear_bias, target, weight, sample_weight, o,
                  shard=(class_start, classes))
    rows = input.shape[0]
    ce.check_row_outputs(op, grad_loss, row_max, row_log_sum, total_weight, rows, o.reduction, input)
    ce.check_shard_rows(op, row_weight, weight_sum, rows, input)
    ce.check_extras(op, grad_logprob, grad_entropy, row_entropy, target, rows, input)
    return _backward_chunks(grad_loss, input, linear_weight, linear_bias, target, weight, sample_weight, row_max,
                            row_log_sum, total_weight, (grad_logprob, grad_entropy, row_entropy), o, output_mask,
                            shard=(class_start, classes, row_weight, weight_sum))
