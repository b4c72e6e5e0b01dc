"""What the two losses, cross_entropy and linear_cross_entropy, share: their options
value, the checks of their common arguments, the extras from the kernels' per-row
outputs, the tangents of rows, and the plain-PyTorch reference of a loss over rows of
logits (the executable spec both references are built on).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import torch

from .._library import acc_dtype
from .._validation import REDUCTIONS, check_same, check_tensor, needs_grad, transforms_active
from ..backends import available_backends, has_capability, op, resolve_backend
from ..distributed import VocabParallel

# The capability of a loss's backend: the backward of a shard of the classes.
SHARD_BACKWARD = "shard_backward"

__all__ = ["NO_EXTRAS", "SHARD_BACKWARD", "CrossEntropyOutput", "Extras", "LMPlan", "Options", "capped",
           "check_class_indices", "check_class_weight", "check_lm_options", "check_options", "check_target",
           "check_vocab_parallel", "cross_entropy_2d", "extras", "finish", "finish_lm", "plan", "plan_lm",
           "probability_target_grad", "reduce_rows", "reference_logprob_entropy", "reference_objective",
           "reference_rows",
           "refuse_class_weight_tangent", "row_logprob", "row_tangents", "target_grad_of", "tempered"]


# --------------------------------------------------------------------------- options

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
    temperature: float = 1.0
    entropy: bool = False  # forward also gives each row's entropy
    # The dispatcher ops' arguments, in their schemas' order: made once, read on every call.
    args: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", (self.reduction, self.ignore_index, self.label_smoothing,
                                          self.lse_square_scale, self.softcap, self.temperature, self.entropy))

    @staticmethod
    def of(reduction: str, ignore_index: int, label_smoothing: float, lse_square_scale: float,
           softcap: Optional[float], temperature: float = 1.0, entropy: bool = False) -> "Options":
        """The options of a public call, its arguments checked (check_options); one value
        per distinct set of options (a training loop repeats its own), so that an eager
        call pays a dictionary lookup, not a frozen dataclass's constructor."""
        if torch.compiler.is_compiling():  # traced: a constant of the graph, no cache to guard
            return _new_options(reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature,
                                entropy)
        key = (reduction, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, entropy)
        found = _OPTIONS.get(key)
        if found is None:
            if len(_OPTIONS) >= 256:
                _OPTIONS.clear()
            found = _OPTIONS[key] = _new_options(*key)
        return found

    def reference(self, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                  sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The reference loss of rows of logits with these options."""
        return cross_entropy_2d(input, target, weight, self.ignore_index, _REDUCTION_NAMES[self.reduction],
                                self.label_smoothing, self.lse_square_scale, self.softcap or None, self.temperature,
                                sample_weight)


_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}


_OPTIONS: dict[tuple, Options] = {}


def _new_options(reduction: str, ignore_index: int, label_smoothing: float, lse_square_scale: float,
                 softcap: Optional[float], temperature: float, entropy: bool) -> Options:
    return Options(REDUCTIONS[reduction], ignore_index, float(label_smoothing), float(lse_square_scale),
                   float(softcap or 0.0), float(temperature), bool(entropy))


# --------------------------------------------------------------------------- checks

def check_options(ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float,
                  softcap: Optional[float], temperature: float = 1.0) -> None:
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
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")


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


def check_vocab_parallel(shard: VocabParallel, columns: int, what: str, device: torch.device, backend: str,
                         op_name: str) -> None:
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


def plan(op_name: str, backend: Optional[str], device: torch.device, target: torch.Tensor, probabilities: bool,
         ignore_index: int, classes: int, vocab_parallel: Optional[VocabParallel], what: str,
         return_accuracy: bool) -> tuple[torch.Tensor, str]:
    """What a loss's public function settles once its arguments are checked: the backend
    that runs it (resolved once) and the checks that depend on the backend. Returns the
    target as the kernels read it (int64 class indices) and the backend's name.

    ``classes``: the columns of this call's logits, ``what`` names them (with
    ``vocab_parallel``, this rank's; the class indices go up to every rank's).
    """
    if return_accuracy and probabilities:
        raise ValueError("return_accuracy needs class-index targets, not probabilities")
    if target.dtype == torch.uint8:
        target = target.long()
    name = resolve_backend(backend, device, op_name)
    if vocab_parallel is not None:
        check_vocab_parallel(vocab_parallel, classes, what, device, name, op_name)
    # The cpp kernels raise on a class index out of range as they read it.
    if not probabilities and (name != "cpp" or vocab_parallel is not None):
        check_class_indices(target, vocab_parallel.classes if vocab_parallel is not None else classes, ignore_index)
    return target, name


# --------------------------------------------------------------------------- a language model's options

class LMPlan(NamedTuple):
    """How a call's per-token weights, exact normalizer and shift enter it: what the
    kernels run (``target``, ``sample_weight``, ``reduction``) and what is done to their
    result (:func:`finish_lm`)."""

    target: torch.Tensor                   # the target, shifted
    sample_weight: Optional[torch.Tensor]  # the kernels' per-row weights, shifted (None: none, or composed)
    composed: Optional[torch.Tensor]       # weights that require grad, applied to the rows' losses after
    reduction: str                         # the kernels' reduction
    normalizer: Optional[Union[float, torch.Tensor]]
    shift: int


def check_lm_options(sample_weight: Optional[torch.Tensor], normalizer, shift: int, reduction: str,
                     batch_shape: tuple, probabilities: bool, input: torch.Tensor, want: "Extras") -> None:
    """Checks the options a language model's loop adds: ``sample_weight`` of the
    unreduced loss's shape ``batch_shape``, ``normalizer`` (a number > 0 or a 0-d tensor
    on the input's device, with reduction ``'mean'``), ``shift`` in [0, T) along the
    batch shape's last dimension, and the extras the target allows."""
    if sample_weight is not None:
        check_tensor("sample_weight", sample_weight)
        if not sample_weight.is_floating_point():
            raise TypeError(f"sample_weight must be a floating-point tensor, got {sample_weight.dtype}")
        if sample_weight.device != input.device:
            raise ValueError(f"sample_weight is on {sample_weight.device} but input is on {input.device}: "
                             "expected all tensors on one device")
        if tuple(sample_weight.shape) != tuple(batch_shape):
            raise ValueError(f"sample_weight must have the shape of the unreduced loss (the class-index target's), "
                             f"{tuple(batch_shape)}, got {tuple(sample_weight.shape)}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer replaces the divisor of reduction='mean', got reduction={reduction!r}")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
            if normalizer.device != input.device:
                raise ValueError(f"normalizer is on {normalizer.device} but input is on {input.device}: a tensor "
                                 "normalizer must be on the input's device (no copy, no host sync)")
            if normalizer.is_complex() or normalizer.dtype == torch.bool:
                raise TypeError(f"normalizer must hold a real number, got {normalizer.dtype}")
        elif (isinstance(normalizer, bool) or not isinstance(normalizer, (int, float))
              or not 0 < normalizer < math.inf):
            raise ValueError(f"normalizer must be a finite number > 0 or a 0-d tensor, got {normalizer!r}")
    if not isinstance(shift, int) or isinstance(shift, bool):
        raise TypeError(f"shift must be an int, got {type(shift).__name__}")
    if shift:
        if probabilities:
            raise ValueError("shift applies to class-index targets (token ids), not to probabilities, which are "
                             "given for the logits' own positions")
        if len(batch_shape) == 0 or not 0 <= shift < batch_shape[-1]:
            length = batch_shape[-1] if batch_shape else 0
            raise ValueError(f"shift must be in [0, {length}) for a sequence of {length} positions (the target's "
                             f"last dimension), got {shift}")
    elif shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if want.logprob and probabilities:
        raise ValueError("return_logprob needs class-index targets: a target of probabilities has no one target "
                         "class")


def _shifted(tensor: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """``tensor`` moved ``shift`` places back along its last dimension, the last ``shift``
    places ``fill``: position t then holds what t + shift held."""
    tail = tensor.new_full((*tensor.shape[:-1], shift), fill)
    return torch.cat([tensor[..., shift:], tail], dim=-1)


def plan_lm(target: torch.Tensor, sample_weight: Optional[torch.Tensor], normalizer, shift: int, reduction: str,
            ignore_index: int) -> LMPlan:
    """The :class:`LMPlan` of checked options. ``shift`` scores position t against the
    target t + shift: the target (and its weights) move back and the last ``shift``
    positions are ignored, so that the input's rows stay as they are, uncopied.
    Weights that require grad are applied to the rows' losses after the kernels
    (their gradient is the rows' losses); the kernels apply the others."""
    if shift:
        target = _shifted(target, shift, ignore_index)
        sample_weight = _shifted(sample_weight, shift, 0.0) if sample_weight is not None else None
    composed = None
    if sample_weight is not None and needs_grad(sample_weight):
        composed, sample_weight = sample_weight, None
        kernel_reduction = "none"
    else:
        kernel_reduction = "sum" if normalizer is not None else reduction
    return LMPlan(target, sample_weight, composed, kernel_reduction, normalizer, shift)


def finish_lm(result, lm: LMPlan, reduction: str, target_rows: torch.Tensor, weight: Optional[torch.Tensor],
              ignore_index: int):
    """A call's result from the kernels', as :func:`plan_lm` planned it: the weights
    that require grad applied and the rows reduced, the normalizer dividing, and the
    positions the shift dropped cut from every per-position output."""
    if lm.composed is None and lm.normalizer is None and not lm.shift:
        return result
    full = isinstance(result, CrossEntropyOutput)
    loss = result.loss if full else result
    if lm.composed is not None:
        acc = acc_dtype(loss.dtype)
        weighted = loss.to(acc) * lm.composed.to(acc)
        if reduction == "none":
            loss = weighted.to(loss.dtype)
        else:
            total = weighted.sum()
            if reduction == "mean":
                total = total / (lm.normalizer if lm.normalizer is not None
                                 else _weighted_divisor(lm.composed.reshape(-1).to(acc), target_rows, weight,
                                                        ignore_index))
            loss = total.to(loss.dtype)
    elif lm.normalizer is not None:
        loss = (loss.to(acc_dtype(loss.dtype)) / lm.normalizer).to(loss.dtype)
    if lm.shift:
        cut = (lambda t: t[..., :t.shape[-1] - lm.shift] if t is not None else None)
        if reduction == "none":
            loss = cut(loss)
        if full:
            return CrossEntropyOutput(loss, cut(result.lse), result.accuracy, cut(result.logprob),
                                      cut(result.entropy))
    return result._replace(loss=loss) if full else loss


def _weighted_divisor(s: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                      ignore_index: int) -> torch.Tensor:
    """The 'mean' divisor with per-row weights s: sum of s w_t over the rows kept (of s
    for probabilities)."""
    if target.is_floating_point():
        return s.sum()
    kept = target != ignore_index
    w_t = weight.to(s.dtype)[torch.where(kept, target, 0)] if weight is not None else torch.ones_like(s)
    return torch.where(kept, s * w_t, 0.0).sum()


# --------------------------------------------------------------------------- outputs

class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` returns when asked for its extras.

    Attributes:
        loss: the loss, as without extras.
        lse: with ``return_lse``, the log-sum-exp of each element's logits (capped, over
            the temperature), of the shape of an unreduced loss; NaN where the target is
            ignore_index (those logits are not read). Else None.
        accuracy: with ``return_accuracy``, the fraction of the elements not ignored
            whose target's logit is the largest of its row (ties count as right); NaN
            where all are ignored. Else None.
        logprob: with ``return_logprob``, each element's log-probability of its target
            class, differentiable; 0 where the target is ignore_index, so that a masked
            sum needs no further mask. Else None.
        entropy: with ``return_entropy``, the entropy of each element's softmax,
            differentiable; 0 where the target is ignore_index. Else None.
    """

    loss: torch.Tensor
    lse: Optional[torch.Tensor]
    accuracy: Optional[torch.Tensor]
    logprob: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


class Extras(NamedTuple):
    """The extras a call asks for."""

    lse: bool = False
    accuracy: bool = False
    logprob: bool = False
    entropy: bool = False

    @property
    def rows(self) -> bool:
        """Whether any needs the rows' statistics."""
        return self.lse or self.accuracy or self.logprob or self.entropy


NO_EXTRAS = Extras()


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


def row_logprob(row_max: torch.Tensor, row_log_sum: torch.Tensor, target_logit: torch.Tensor, target: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    """Each row's log-probability of its class-index target from forward's statistics
    (z_t - lse, in the accumulation dtype), 0 where the target is ignored."""
    return torch.where(target != ignore_index, (target_logit - row_max) - row_log_sum, 0.0)


def finish(loss: torch.Tensor, rows: Optional[tuple], target: torch.Tensor, options: Options, batch_shape: torch.Size,
           want: Extras) -> Union[torch.Tensor, CrossEntropyOutput]:
    """A loss's public result from its rows': the loss in the batch shape for reduction
    none, and the extras asked for, from ``rows`` = (row_max, row_log_sum, target_logit,
    logprob, entropy) of (R,) or (R, C) targets."""
    loss = loss.reshape(batch_shape) if options.reduction == REDUCTIONS["none"] else loss
    if not want.rows:
        return loss
    row_max, row_log_sum, target_logit, logprob, entropy = rows
    lse, accuracy = extras(row_max, row_log_sum, target_logit, target, options.ignore_index, batch_shape,
                           want.lse, want.accuracy)
    return CrossEntropyOutput(loss, lse, accuracy, logprob.reshape(batch_shape) if want.logprob else None,
                              entropy.reshape(batch_shape) if want.entropy else None)


def reduce_rows(losses: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype) -> torch.Tensor:
    """The op's loss, in ``dtype``, from each row's: the rows summed in float64, as the
    kernels sum them; a mean over no weight is nan."""
    if reduction == REDUCTIONS["none"]:
        return losses.to(dtype)
    total = losses.double().sum()
    if reduction == REDUCTIONS["mean"]:
        total = total / total_weight.double()
    return total.to(dtype)


# --------------------------------------------------------------------------- derivatives

def refuse_class_weight_tangent(weight_t: Optional[torch.Tensor]) -> None:
    """Class weights are not differentiated, in forward mode either: a tangent for them
    is refused as a weight that requires grad is, not dropped."""
    if weight_t is not None:
        raise ValueError("weight has a forward-mode tangent, but myext does not differentiate the class weights; "
                         "pass a weight without one")


def row_tangents(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                 sample_weight: Optional[torch.Tensor], row_max: torch.Tensor, row_log_sum: torch.Tensor,
                 total_weight: torch.Tensor, options: Options, backend: str, logits_t: Optional[torch.Tensor],
                 target_t: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's loss tangent (R,), in the accumulation dtype: the row's gradient with
    respect to its logits (the backward kernel's, for an unreduced loss and an upstream
    gradient of 1) dotted with ``logits_t``, plus, for probabilities, the gradient with
    respect to them, -(1 - eps) w logp (times the row's weight), dotted with ``target_t``."""
    acc = row_max.dtype
    per_row = dataclasses.replace(options, reduction=REDUCTIONS["none"])
    ones = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    tangent = torch.zeros(logits.shape[0], dtype=acc, device=logits.device)
    if logits_t is not None:
        grad = op("cross_entropy_backward", backend)(ones, logits, target, weight, sample_weight, row_max,
                                                     row_log_sum, total_weight, None, None, None, *per_row.args)
        tangent = tangent + (grad.to(acc) * logits_t.to(acc)).sum(dim=1)
    if target_t is not None:
        z = tempered(capped(logits.to(acc), options.softcap or None), options.temperature)
        logp = z - (row_max + row_log_sum).unsqueeze(1)
        tangent = tangent + (target_grad_of(ones, logp, weight, per_row, sample_weight)
                             * target_t.to(acc)).sum(dim=1)
    return tangent


def probability_target_grad(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                            weight: Optional[torch.Tensor], options: Options,
                            sample_weight: Optional[torch.Tensor] = None,
                            total_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient for probability targets q of logits (R, C): -(1 - eps) w_c logp_ic
    times row i's upstream gradient and weight (divided by the 'mean' divisor), logp the
    log-softmax of the capped, tempered logits. From torch ops, without autograd.grad,
    so that torch.compile traces it and autograd differentiates it again."""
    logits = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    logp = torch.log_softmax(tempered(capped(logits, options.softcap or None), options.temperature), dim=1)
    return target_grad_of(grad_loss, logp, weight, options, sample_weight, total_weight).to(target.dtype)


def target_grad_of(grad_loss: torch.Tensor, logp: torch.Tensor, weight: Optional[torch.Tensor],
                   options: Options, sample_weight: Optional[torch.Tensor] = None,
                   total_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-(1 - eps) w_c logp_ic times row i's upstream gradient and weight s_i (divided by
    the 'mean' divisor, R or sum(s) where not given): the gradient for probability
    targets, given the log-softmax ``logp`` (R, C)."""
    scale = grad_loss.to(logp.dtype)
    if options.reduction == REDUCTIONS["none"]:
        scale = scale.unsqueeze(1)
    elif options.reduction == REDUCTIONS["mean"]:
        if total_weight is not None:
            scale = scale / total_weight.to(logp.dtype)
        else:
            scale = scale / (logp.shape[0] if sample_weight is None else sample_weight.to(logp.dtype).sum())
    if sample_weight is not None:
        scale = scale * sample_weight.to(logp.dtype).unsqueeze(1)
    grad = logp * (-(1.0 - options.label_smoothing) * scale)
    return grad * weight.to(logp.dtype) if weight is not None else grad


# --------------------------------------------------------------------------- the spec

def capped(input: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
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


def reference_rows(input: torch.Tensor, target: torch.Tensor, options: Options):
    """Each row's max and log-sum and the target's logit, as the kernels give them, from
    torch ops (the torch backend's extras)."""
    with torch.no_grad():
        z = tempered(capped(input.float() if input.dtype in (torch.float16, torch.bfloat16) else input,
                            options.softcap), options.temperature)
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
    temperature: float = 1.0,
    sample_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    As PyTorch defines it, with logp = log_softmax(z), z the logits capped at
    softcap * tanh(input / softcap) where softcap is given and divided by
    ``temperature``, and w the class weights (ones if none). Probabilities q, smoothed
    to (1 - eps) q + eps / C: loss_i = -sum_c w_c q_ic logp_ic, and 'mean' divides by
    R. Class indices t: loss_i = (1 - eps) nll_i + eps / C smooth_i with nll_i = -w_t
    logp_it and smooth_i = -sum_c w_c logp_ic, 0 for rows whose index is ignore_index
    (their gradient is 0, also for NaN or infinite logits, where PyTorch's is NaN);
    'mean' divides each of the two sums by the summed weight w_t of the rows kept, so
    that a divisor of 0 gives nan. The smoothing terms are left out for eps = 0 (where
    an infinite logit would make 0 * inf). The z-loss adds lse_square_scale * lse_i^2
    to the loss of each row kept, divided by the same divisor for 'mean'. Per-row
    weights s (``sample_weight``) multiply each row's loss, and the 'mean' divisor
    becomes sum_i s_i w_ti over the rows kept (sum_i s_i for probabilities).
    half-precision input is computed in float32 and the loss cast back.
    """
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):
        input = input.float()
        target = target.float() if target.is_floating_point() else target
        weight = weight.float() if weight is not None else None
    if sample_weight is not None:
        sample_weight = sample_weight.to(input.dtype)
    rows, classes = input.shape
    kept = None
    if not target.is_floating_point():
        # Ignored rows take no part, also where their logits are NaN or infinite (PyTorch
        # computes their softmax anyway, and gives them a NaN gradient there).
        kept = target != ignore_index
        input = torch.where(kept.unsqueeze(1), input, torch.zeros_like(input))
    z = tempered(capped(input, softcap), temperature)
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
        if sample_weight is not None:
            losses = losses * sample_weight
        if reduction == "none":
            return losses.to(out_dtype)
        total = losses.sum()
        divisor = rows if sample_weight is None else sample_weight.sum()
        return (total if reduction == "sum" else total / divisor).to(out_dtype)

    safe_target = torch.where(kept, target, torch.zeros_like(target))
    w_target = w[safe_target] * kept
    nll = torch.where(kept, -w_target * logp.gather(1, safe_target.unsqueeze(1)).squeeze(1), 0.0)
    smooth = torch.where(kept, -(logp * w).sum(dim=1), 0.0) if eps > 0 else None
    z_loss = torch.where(kept, z_loss, 0.0) if z_loss is not None else None
    if sample_weight is not None:
        s = torch.where(kept, sample_weight, 0.0)
        nll, w_target = nll * s, w_target * s
        smooth = smooth * s if smooth is not None else None
        z_loss = z_loss * s if z_loss is not None else None
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


def reference_objective(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                        sample_weight: Optional[torch.Tensor], options: Options, grad_loss: Optional[torch.Tensor],
                        grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference's loss times ``grad_loss``, plus its log-probabilities times
    ``grad_logprob`` and its entropies times ``grad_entropy`` (each where given), summed:
    the scalar whose gradient is the one backward gives for those upstream gradients."""
    total = logits.new_zeros((), dtype=acc_dtype(logits.dtype))
    if grad_loss is not None:
        total = total + (options.reference(logits, target, weight, sample_weight) * grad_loss).sum()
    logprob, entropy = reference_logprob_entropy(logits, target, options)
    if grad_logprob is not None:
        total = total + (logprob * grad_logprob).sum()
    if grad_entropy is not None:
        total = total + (entropy * grad_entropy).sum()
    return total


def tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The (capped) logits divided by the temperature; 1 leaves them as they are."""
    return z if temperature == 1.0 else z / temperature


def reference_logprob_entropy(input: torch.Tensor, target: torch.Tensor, options: Options):
    """Each row's log-probability of its class-index target (None for probabilities)
    and the entropy of its softmax, from torch ops that differentiate: 0 for ignored
    rows (whose logits are not read), and a class of probability 0 adds 0 to the
    entropy (the limit of p log p), not NaN; NaN for a row without a finite
    log-sum-exp. In the accumulation dtype."""
    acc = acc_dtype(input.dtype)
    x = input.to(acc)
    kept = None if target.is_floating_point() else target != options.ignore_index
    if kept is not None:
        x = torch.where(kept.unsqueeze(1), x, torch.zeros_like(x))
    z = tempered(capped(x, options.softcap or None), options.temperature)
    lse = z.logsumexp(dim=1)
    gap = lse.unsqueeze(1) - z
    p = torch.exp(-gap)
    entropy = torch.where(p > 0, p * torch.where(p > 0, gap, 0.0), 0.0).sum(dim=1)
    # A row with a NaN or +inf logit, or with every logit -inf, has no softmax (as
    # PyTorch's -sum(p log p) is NaN there): NaN, not the 0 the masked sum would give.
    entropy = torch.where(lse.isfinite(), entropy, math.nan)
    logprob = None
    if kept is not None:
        safe = torch.where(kept, target, torch.zeros_like(target))
        logprob = torch.where(kept, -gap.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0)
        entropy = torch.where(kept, entropy, 0.0)
    return logprob, entropy
