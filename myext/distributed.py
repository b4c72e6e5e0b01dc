"""myext on torch.distributed: which classes a rank holds, and the collectives its losses use.

Vocabulary (class) parallelism, as Megatron-LM splits a language model's output layer:
each rank of a process group holds the logits of classes ``[start, stop)`` of ``C``, or
the rows ``[start, stop)`` of the output layer's weight, and the cross-entropy over all
``C`` classes is computed without gathering the logits. Per row, each rank reduces its
columns to a few numbers (max, sum of exponentials, target logit, smoothing sums) and
``all_reduce`` combines them: two collectives of a few scalars per row, never a row of
logits. :class:`VocabParallel` describes the split; pass it to
:func:`myext.cross_entropy` or :func:`myext.linear_cross_entropy` as ``vocab_parallel``.

The loss is replicated: every rank gets the same value, and each rank's backward gives
the gradient of its own shard (and, for linear_cross_entropy, the input's whole
gradient, summed over the ranks). As in Megatron-LM, the upstream gradient of the loss
must be the same on every rank.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["VocabParallel", "all_reduce_max", "all_reduce_sum", "from_dtensor", "is_dtensor", "replicated",
           "split_range", "to_local"]


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` of ``size`` items split into ``parts`` nearly
    equal parts, the first ``size % parts`` one larger (as ``torch.tensor_split``)."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """This rank holds classes ``[start, stop)`` of ``classes``; the other ranks of
    ``group`` hold the rest, each class on exactly one rank.

    Args:
        start: the first class of this rank's shard.
        stop: one past its last class; the logits this rank passes have ``stop - start``
            classes.
        classes: ``C``, the number of classes of the whole problem.
        group: the process group whose ranks share the classes; ``None`` is the default
            group.

    Example::

        >>> shard = VocabParallel.split(32000)  # this rank's even share of 32000 classes
        >>> loss = myext.cross_entropy(logits[:, shard.start:shard.stop], labels, vocab_parallel=shard)
    """

    start: int
    stop: int
    classes: int
    group: Optional[dist.ProcessGroup] = None

    def __post_init__(self) -> None:
        for name in ("start", "stop", "classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"VocabParallel.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.start <= self.stop <= self.classes:
            raise ValueError(f"VocabParallel needs 0 <= start <= stop <= classes, got start={self.start}, "
                             f"stop={self.stop}, classes={self.classes}")

    @classmethod
    def split(cls, classes: int, group: Optional[dist.ProcessGroup] = None) -> "VocabParallel":
        """This rank's share of ``classes`` split as evenly as possible over ``group``
        (the default group if ``None``), in rank order; the first ``classes % world_size``
        ranks hold one class more."""
        start, stop = split_range(classes, dist.get_world_size(group), dist.get_rank(group))
        return cls(start, stop, classes, group)

    @property
    def size(self) -> int:
        """The number of classes this rank holds."""
        return self.stop - self.start


def all_reduce_max(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The elementwise max of ``tensor`` over the ranks of ``group``, in a new tensor;
    not differentiable."""
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, whose backward passes the (replicated) upstream gradient
    through unchanged: Megatron-LM's reduce-from-tensor-parallel region.
    ``torch.distributed.nn.functional.all_reduce`` instead sums the upstream gradients
    too, the gradient of a loss counted once per rank."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the ranks of ``group``, in a new tensor.

    Differentiable where the sum is used alike on every rank (its upstream gradient is
    replicated) and ``tensor`` depends on this rank's own tensors alone: a term that
    depends on another sum over the ranks would need the gradients of every rank's
    term summed, which this backward does not do."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return _AllReduceSum.apply(tensor, group)
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _Replicated(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the ranks: Megatron-LM's
    copy-to-tensor-parallel region."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``tensor``, the same on every rank of ``group`` and used by each rank's shard of
    the work: its gradient is the sum of every rank's (the identity in forward)."""
    return _Replicated.apply(tensor, group)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (without importing torch.distributed.tensor, which
    a caller holding a DTensor has imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def from_dtensor(tensor: Any, class_dim: int) -> tuple[torch.Tensor, VocabParallel]:
    """This rank's shard of a DTensor whose dimension ``class_dim`` (the classes) is
    ``Shard`` on a 1-d mesh, and the :class:`VocabParallel` that describes it. DTensor
    shards as ``torch.chunk`` does: ``ceil(C / world_size)`` classes a rank, the last
    ranks fewer or none. ``to_local`` is differentiable: the shard's gradient comes back
    to the DTensor."""
    mesh = tensor.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"a DTensor of logits must live on a 1-d device mesh, got a {mesh.ndim}-d one")
    (placement,) = tensor.placements
    if not placement.is_shard(class_dim):
        raise ValueError(f"a DTensor of logits must be Shard({class_dim}) (its classes split across the mesh), "
                         f"got {placement}")
    classes, world_size, rank = tensor.shape[class_dim], mesh.size(), mesh.get_local_rank()
    per_rank = -(-classes // world_size)
    start = min(rank * per_rank, classes)
    shard = VocabParallel(start, min(start + per_rank, classes), classes, mesh.get_group())
    return tensor.to_local(), shard


def to_local(tensor: Any, mesh: Any, name: str) -> Any:
    """The local tensor of ``tensor`` where it is a DTensor on ``mesh`` (a Replicate one
    is whole on every rank, a Shard one this rank's part), else ``tensor``."""
    if not is_dtensor(tensor):
        return tensor
    if tensor.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on another device mesh than the logits'")
    return tensor.to_local()
