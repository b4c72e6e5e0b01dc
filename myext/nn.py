"""Drop-in ``torch.nn`` modules backed by myext's fused ops.

:class:`FusedLinearReLU` replaces an ``nn.Linear`` followed by an ``nn.ReLU``;
:class:`CrossEntropyLoss` replaces ``nn.CrossEntropyLoss``; :class:`LinearCrossEntropyLoss`
replaces ``nn.LinearCrossEntropyLoss`` (a classifier's last layer and its loss). Each
keeps the parameter, buffer and ``state_dict`` names of the module it replaces, so
checkpoints move between them in either direction.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .functional import cross_entropy, linear_cross_entropy, linear_relu
from .ops.cross_entropy import check_options

__all__ = ["CrossEntropyLoss", "FusedLinearReLU", "LinearCrossEntropyLoss"]


class FusedLinearReLU(nn.Module):
    r"""Applies :math:`y = \mathrm{ReLU}(x A^T + b)` as one fused op.

    Equivalent to ``nn.Sequential(nn.Linear(in_features, out_features, bias), nn.ReLU())``,
    with ``nn.Linear``'s parameters, initialisation and ``state_dict`` keys (``weight``,
    ``bias``): a state dict saved from an ``nn.Linear`` loads into this module and back.

    It is deliberately not a subclass of ``nn.Linear``: code that treats every
    ``nn.Linear`` as affine (quantisation, pruning, fx passes) must not mistake it for one.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        device: the device of the parameters.
        dtype: the dtype of the parameters.
        backend: the kernels to run, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``;
            ``None`` (default) picks ``$MYEXT_BACKEND`` or the best one for the input's
            device at each call, so the module follows ``.to(device)``.

    Shape:
        - Input: :math:`(*, H_{in})` with :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` with :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight: the learnable weights of shape :math:`(\text{out\_features}, \text{in\_features})`,
            initialised from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})` with :math:`k = 1/\text{in\_features}`.
        bias: the learnable bias of shape :math:`(\text{out\_features})`, initialised likewise.

    Example::

        >>> layer = myext.nn.FusedLinearReLU(784, 128)
        >>> layer(torch.randn(64, 784)).shape
        torch.Size([64, 128])
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    weight: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        backend: Optional[str] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises weight and bias exactly as ``nn.Linear`` does.

        Calls ``nn.Linear``'s own initialiser, so the random draws match: under the same
        seed this layer starts from the same weights as the ``nn.Linear`` it replaces.
        """
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Optional[str] = None) -> "FusedLinearReLU":
        """Builds a fused layer that computes ``relu(linear(x))``, **sharing** ``linear``'s parameters.

        The new module holds the very same ``nn.Parameter`` objects as ``linear`` (no copy):
        training either module updates both, and an optimizer built over one also steps the
        other. Pass ``copy.deepcopy(linear)`` for an independent layer.

        Args:
            linear: an initialised ``nn.Linear`` (or a subclass that keeps its ``forward``).
            backend: as in the constructor.

        Returns:
            A ``FusedLinearReLU`` in ``linear``'s training mode.
        """
        if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("from_linear needs an initialised layer: run a LazyLinear once before converting it")
        # Built on the meta device so that the throw-away initial parameters cost nothing.
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, backend=backend)
        fused.weight = linear.weight
        if linear.bias is not None:
            fused.bias = linear.bias
        fused.train(linear.training)
        return fused

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_relu(input, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r"""``nn.CrossEntropyLoss`` computed by myext's fused cross-entropy kernel.

    Takes ``nn.CrossEntropyLoss``'s arguments in the same order, including the deprecated
    ``size_average`` and ``reduce`` (PyTorch turns them into ``reduction``, with its
    deprecation warning), and keeps ``weight`` as a buffer of the same name. It is a
    subclass of ``nn.CrossEntropyLoss``, so ``isinstance`` checks written for that keep
    working.

    Args:
        weight: a manual rescaling weight given to each class, of size ``C``.
        size_average: deprecated, see ``reduction``.
        ignore_index: a target value that is ignored and does not contribute to the
            input gradient. Default: ``-100``.
        reduce: deprecated, see ``reduction``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``. Default: ``"mean"``.
        label_smoothing: a float in ``[0.0, 1.0]``, the amount of smoothing. Default: ``0.0``.
        lse_square_scale: (keyword only) the z-loss scale, as in :func:`myext.cross_entropy`.
            Default: ``0.0``.
        softcap: (keyword only) the logits' soft cap, as in :func:`myext.cross_entropy`.
            Default: ``None``.
        shift, temperature: (keyword only) as in :func:`myext.cross_entropy`. Defaults:
            ``0`` and ``1.0``.
        backend: (keyword only) the kernels to run, as in :func:`myext.cross_entropy`;
            ``None`` picks ``$MYEXT_BACKEND`` or the best one for the input's device.
        inplace_backward: (keyword only) write the gradient over the logits in backward,
            as in :func:`myext.cross_entropy`: saves an ``N x C`` buffer, for logits that
            nothing else reads after the loss. Default: ``False``.

    Shape:
        As ``nn.CrossEntropyLoss``: input :math:`(C)`, :math:`(N, C)` or
        :math:`(N, C, d_1, ..., d_K)`; target of class indices or of class probabilities.

    ``forward(input, target, sample_weight=None, normalizer=None)``: the per-element
    weights and the exact normalizer of :func:`myext.cross_entropy`, per call.

    Example::

        >>> loss = myext.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss(torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))).backward()
    """

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: Optional[float] = None,
        shift: int = 0,
        temperature: float = 1.0,
        backend: Optional[str] = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.shift = shift
        self.temperature = temperature
        self.backend = backend
        self.inplace_backward = inplace_backward

    @classmethod
    def from_torch(cls, loss: nn.CrossEntropyLoss, backend: Optional[str] = None) -> "CrossEntropyLoss":
        """Builds the myext loss with ``loss``'s settings, sharing its ``weight`` tensor (no copy)."""
        if not isinstance(loss, nn.CrossEntropyLoss):
            raise TypeError(f"from_torch expects an nn.CrossEntropyLoss, got {type(loss).__name__}")
        converted = cls(loss.weight, ignore_index=loss.ignore_index, reduction=loss.reduction,
                        label_smoothing=loss.label_smoothing, backend=backend)
        converted.train(loss.training)
        return converted

    def forward(self, input: torch.Tensor, target: torch.Tensor, sample_weight: Optional[torch.Tensor] = None,
                normalizer: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             sample_weight=sample_weight, normalizer=normalizer, shift=self.shift,
                             temperature=self.temperature, lse_square_scale=self.lse_square_scale,
                             softcap=self.softcap, backend=self.backend, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        # nn.CrossEntropyLoss prints no arguments; ours adds only what it adds.
        added = [f"lse_square_scale={self.lse_square_scale}"] if self.lse_square_scale else []
        if self.softcap is not None:
            added.append(f"softcap={self.softcap}")
        if self.shift:
            added.append(f"shift={self.shift}")
        if self.temperature != 1.0:
            added.append(f"temperature={self.temperature}")
        if self.backend is not None:
            added.append(f"backend={self.backend!r}")
        if self.inplace_backward:
            added.append("inplace_backward=True")
        return ", ".join(added)


class LinearCrossEntropyLoss(nn.modules.loss._WeightedLoss):
    r"""``nn.LinearCrossEntropyLoss`` computed by :func:`myext.linear_cross_entropy`:
    the cross-entropy of ``self.linear(input)`` without holding those logits whole.

    Takes ``nn.LinearCrossEntropyLoss``'s constructor arguments and keeps its names:
    the head is ``self.linear`` (an ``nn.Linear(in_features, num_classes)``), the class
    weights the buffer ``weight``, so ``state_dict``\ s (``linear.weight``,
    ``linear.bias``) load into either module. Beyond PyTorch's, the options of
    :func:`myext.linear_cross_entropy`. Not supported: PyTorch's ``options`` (ours
    always runs in chunks, allows backward more than once, and takes ``chunk_size``
    instead). The constructor refuses the arguments PyTorch's refuses, and the options
    the function would refuse at the first call.

    Args:
        in_features: size of each input sample, :math:`H`.
        num_classes: number of classes, :math:`C`.
        out_features: :math:`(d_1, ..., d_K)` for a K-dimensional loss, each position a
            head of its own over the same input; ``()`` (default) for one. The head's
            weight is stored flat, ``(C * d_1 * ... * d_K, H)``, as PyTorch's.
        bias: whether the head adds a learnable bias. Default: ``False``.
        device, dtype: of the head's parameters.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``. Default: ``"mean"``.
        weight: a manual rescaling weight given to each class, of size ``C``.
        ignore_index: a target value that is ignored; ``None`` (default) means -100.
        label_smoothing: a float in ``[0.0, 1.0]``. Default: ``0.0``.
        lse_square_scale, softcap, shift, temperature, chunk_size, accum_dtype, backend: as in
            :func:`myext.linear_cross_entropy`.

    Shape:
        - Input: :math:`(H)`, :math:`(N, H)` or :math:`(*, H)`; :math:`(N, H)` with
          ``out_features``.
        - Target: class indices :math:`()`, :math:`(N)` or :math:`(*)`, or probabilities
          with a last dimension of ``C``; with ``out_features`` class indices
          :math:`(N, d_1, ..., d_K)` or probabilities :math:`(N, C, d_1, ..., d_K)`.
        - Output: a scalar; for ``reduction="none"`` the target's batch shape.

    ``forward(input, target, sample_weight=None, normalizer=None)``: the per-element
    weights and the exact normalizer of :func:`myext.linear_cross_entropy`, per call.

    Example::

        >>> head = myext.nn.LinearCrossEntropyLoss(64, 32000, bias=True)
        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> head(hidden, torch.randint(0, 32000, (2, 16))).backward()
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[torch.Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        softcap: Optional[float] = None,
        shift: int = 0,
        temperature: float = 1.0,
        chunk_size: Optional[int] = None,
        accum_dtype: Optional[torch.dtype] = None,
        backend: Optional[str] = None,
    ) -> None:
        out_features = tuple(out_features)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in out_features):
            raise ValueError(f"out_features must be a tuple of positive ints, got {out_features}")
        if weight is not None and weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        check_options(-100 if ignore_index is None else ignore_index, reduction, label_smoothing, lse_square_scale,
                      softcap, temperature)
        if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
            raise ValueError(f"shift must be an int >= 0, got {shift!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
        # Against the input's dtype at each call: the head's may change with .to().
        if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
            raise ValueError(f"accum_dtype must be a torch.dtype or None, got {accum_dtype!r}")
        super().__init__(weight=weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.shift = shift
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype
        self.backend = backend
        self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias, device=device,
                                dtype=dtype)

    @classmethod
    def from_torch(cls, loss: nn.Module, backend: Optional[str] = None) -> "LinearCrossEntropyLoss":
        """Builds the myext loss from an ``nn.LinearCrossEntropyLoss``, sharing its head
        and ``weight`` (no copy); PyTorch's ``options`` are left behind."""
        torch_class = getattr(nn, "LinearCrossEntropyLoss", None)
        if torch_class is None or not isinstance(loss, torch_class):
            raise TypeError(f"from_torch expects an nn.LinearCrossEntropyLoss, got {type(loss).__name__}")
        converted = cls(loss.linear.in_features, loss.num_classes, out_features=loss.out_features,
                        reduction=loss.reduction, weight=loss.weight, ignore_index=loss.ignore_index,
                        label_smoothing=loss.label_smoothing, backend=backend, device="meta")
        converted.linear = loss.linear
        converted.train(loss.training)
        return converted

    def forward(self, input: torch.Tensor, target: torch.Tensor, sample_weight: Optional[torch.Tensor] = None,
                normalizer: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        linear_weight, linear_bias = self.linear.weight, self.linear.bias
        if self.out_features:
            linear_weight = linear_weight.reshape(self.num_classes, *self.out_features, self.linear.in_features)
            linear_bias = linear_bias.reshape(self.num_classes, *self.out_features) if linear_bias is not None else None
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, sample_weight=sample_weight,
                                    normalizer=normalizer, shift=self.shift, temperature=self.temperature,
                                    lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                    chunk_size=self.chunk_size, accum_dtype=self.accum_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        text = (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                + (f"out_features={self.out_features}, " if self.out_features else "")
                + f"bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")
        if self.lse_square_scale:
            text += f", lse_square_scale={self.lse_square_scale}"
        if self.softcap is not None:
            text += f", softcap={self.softcap}"
        if self.shift:
            text += f", shift={self.shift}"
        if self.temperature != 1.0:
            text += f", temperature={self.temperature}"
        if self.chunk_size is not None:
            text += f", chunk_size={self.chunk_size}"
        if self.accum_dtype is not None:
            text += f", accum_dtype={self.accum_dtype}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text
