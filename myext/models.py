"""The seed article's two networks: with the Linear+ReLU layer fused, and in plain PyTorch.

Layers and attribute names (``fc1``, ``fc2``, ``fc3``) are the article's, and they are
created in the same order, so that under one seed these models start from the
article's weights, and ``state_dict``s move between the article's classes and these
in both directions. :class:`PlainSimpleNet` and :class:`PlainMultiTaskNet` are the
article's models as it writes them (``nn.Linear`` and ``torch.relu``): the baselines
that ``myext train`` and the benchmarks compare the fused models with.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .functional import cross_entropy, linear_cross_entropy
from .nn import FusedLinearReLU

__all__ = ["MultiTaskNet", "PlainMultiTaskNet", "PlainSimpleNet", "SimpleNet", "multitask_loss"]

IN_FEATURES = 28 * 28
HIDDEN = 128


class SimpleNet(nn.Module):
    r"""flatten → ``fc1`` (784→128) + ReLU, fused → ``fc2`` (128→10): logits of 10 classes.

    Args:
        backend: the kernels of the fused layer (see :func:`myext.linear_relu`);
            ``None`` picks the best for the input's device.

    Shape:
        - Input: :math:`(N, *)` with 784 elements per sample, e.g. :math:`(N, 1, 28, 28)`.
        - Output: :math:`(N, 10)`.

    Example::

        >>> net = myext.models.SimpleNet()
        >>> net(torch.randn(64, 1, 28, 28)).shape
        torch.Size([64, 10])
    """

    def __init__(self, *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.fc1 = FusedLinearReLU(IN_FEATURES, HIDDEN, backend=backend)
        self.fc2 = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc2(self.fc1(x))

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of ``self(x)`` against ``target``, the head ``fc2`` and
        the loss fused (:func:`myext.linear_cross_entropy`): the training step's loss
        without the logits. Equals ``F.cross_entropy(self(x), target)`` up to rounding."""
        hidden = self.fc1(torch.flatten(x, 1))
        return linear_cross_entropy(hidden, self.fc2.weight, target, linear_bias=self.fc2.bias,
                                    backend=self.fc1.backend)


class MultiTaskNet(nn.Module):
    r"""flatten → shared ``fc1`` (784→128) + ReLU, fused → two heads ``fc2`` and ``fc3``.

    Args:
        num_classes1: classes of the first head, ``fc2``. Default: 10.
        num_classes2: classes of the second head, ``fc3``. Default: 10.
        backend: the kernels of the fused layer (see :func:`myext.linear_relu`).

    Shape:
        - Input: :math:`(N, *)` with 784 elements per sample.
        - Output: a tuple of logits :math:`(N, \text{num\_classes1})` and
          :math:`(N, \text{num\_classes2})`.

    Example::

        >>> net = myext.models.MultiTaskNet(num_classes2=2)
        >>> [out.shape for out in net(torch.randn(64, 784))]
        [torch.Size([64, 10]), torch.Size([64, 2])]
    """

    def __init__(self, num_classes1: int = 10, num_classes2: int = 10, *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.fc1 = FusedLinearReLU(IN_FEATURES, HIDDEN, backend=backend)
        self.fc2 = nn.Linear(HIDDEN, num_classes1)
        self.fc3 = nn.Linear(HIDDEN, num_classes2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        return self.fc2(x), self.fc3(x)

    def loss(self, x: torch.Tensor, target1: torch.Tensor, target2: torch.Tensor) -> torch.Tensor:
        """The article's summed loss, the mean cross-entropy of each head, each head and
        its loss fused (:func:`myext.linear_cross_entropy`) on the shared ``fc1``.
        Equals ``multitask_loss(self(x), (target1, target2))`` up to rounding."""
        hidden = self.fc1(torch.flatten(x, 1))
        backend = self.fc1.backend
        return (linear_cross_entropy(hidden, self.fc2.weight, target1, linear_bias=self.fc2.bias, backend=backend)
                + linear_cross_entropy(hidden, self.fc3.weight, target2, linear_bias=self.fc3.bias, backend=backend))


class PlainSimpleNet(nn.Module):
    r"""The article's SimpleNet in plain PyTorch: flatten → ``fc1`` (784→128) → ReLU → ``fc2`` (128→10).

    Shape:
        As :class:`SimpleNet`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class PlainMultiTaskNet(nn.Module):
    r"""The article's MultiTaskNet in plain PyTorch, with the head sizes as arguments.

    Args:
        num_classes1: classes of the first head, ``fc2``. Default: 10.
        num_classes2: classes of the second head, ``fc3``. Default: 10.

    Shape:
        As :class:`MultiTaskNet`.
    """

    def __init__(self, num_classes1: int = 10, num_classes2: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, num_classes1)
        self.fc3 = nn.Linear(HIDDEN, num_classes2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x), self.fc3(x)


def multitask_loss(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    task_weights: Optional[Sequence[float]] = None,
    *,
    label_smoothing: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""The summed cross-entropy of several heads.

    :math:`\sum_t \lambda_t\, \mathrm{CE}(\text{outputs}_t, \text{targets}_t)`.

    Each term is the mean cross-entropy of one head, computed by :func:`myext.cross_entropy`.

    Args:
        outputs: the logits of each head, e.g. what :class:`MultiTaskNet` returns.
        targets: the class indices (or probabilities) of each head, one per output.
        task_weights: :math:`\lambda_t`, one per head; ``None`` (default) weights every head 1,
            the article's plain sum.
        label_smoothing: as in :func:`myext.cross_entropy`, for every head.
        backend: as in :func:`myext.cross_entropy`.

    Returns:
        A scalar.

    Example::

        >>> out1, out2 = net(x)
        >>> loss = myext.models.multitask_loss((out1, out2), (digit, parity))
    """
    if len(outputs) != len(targets):
        raise ValueError(f"multitask_loss needs one target per output, got {len(outputs)} outputs "
                         f"and {len(targets)} targets")
    if len(outputs) == 0:
        raise ValueError("multitask_loss needs at least one output")
    if task_weights is None:
        task_weights = [1.0] * len(outputs)
    elif len(task_weights) != len(outputs):
        raise ValueError(f"multitask_loss needs one task weight per output, got {len(task_weights)} weights "
                         f"for {len(outputs)} outputs")
    losses = [lam * cross_entropy(out, target, label_smoothing=label_smoothing, backend=backend)
              for lam, out, target in zip(task_weights, outputs, targets)]
    return torch.stack(losses).sum()
