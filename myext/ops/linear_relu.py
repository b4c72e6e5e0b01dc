"""Linear+ReLU: ``relu(input @ weight.T + bias)`` as one fused op.

Dispatcher ops (schemas in csrc/myext.cpp): ``myext::linear_relu`` and
``myext::linear_relu_backward``; kernels in csrc/cpu/linear_relu.cpp,
csrc/cuda/linear_relu.cu and triton_ops/linear_relu.py. This module holds the rest of
the op: its argument checks, fake kernels, autograd Functions, the public function,
the plain-PyTorch reference, and its registry spec (samples and benchmark cases).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import registry
from .._batching import is_legacy_batched
from ..backends import op, resolve_backend
from .._validation import check_float_dtype, check_same, check_tensor, needs_grad, transforms_active

__all__ = ["FusedLinearReLUFunction", "FusedLinearReLUJvpFunction", "LinearReLUBackwardFunction",
           "LinearReLUBackwardJvpFunction", "linear_relu", "reference"]

NAME = "linear_relu"


# --------------------------------------------------------------------------- checks

def check_linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Raises a TypeError or ValueError naming the argument that ``linear_relu`` cannot take."""
    check_tensor("input", input)
    check_tensor("weight", weight)
    check_float_dtype("input", input)
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (*, in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d (out_features, in_features), got shape {tuple(weight.shape)}")
    check_same("weight", weight, "input", input)
    # shape[i], not size(i): this runs on every call, and size() is the slower.
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension ({input.shape[-1]}) must equal weight's in_features "
                         f"(weight.shape[1] = {weight.shape[1]}); input shape {tuple(input.shape)}, "
                         f"weight shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        check_same("bias", bias, "input", input)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight's out_features, "
                             f"got {tuple(bias.shape)}")


# --------------------------------------------------------------------------- fake kernels

def linear_relu_fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


# --------------------------------------------------------------------------- autograd

class FusedLinearReLUFunction(torch.autograd.Function):
    """relu(input @ weight.T + bias) with a fused kernel forward and backward.

    ``FusedLinearReLUFunction.apply(input, weight, bias, backend)``, where backend is
    "cpp", "cuda" or "triton" (arguments already checked; see myext.linear_relu).
    Saves the inputs and the output, whose sign is the ReLU mask: no pre-activation
    or mask tensor is kept.

    Reverse mode and torch.compile. In PyTorch's older form, forward taking ``ctx``:
    torch 2.13's apply binds a ``setup_context``-form Function's arguments to its
    forward's signature on every call (inspect.signature, about 12 us), and dynamo
    does not trace a Function that defines ``jvp``. :class:`FusedLinearReLUJvpFunction`
    is the same Function in the ``setup_context`` form with a jvp, for forward-mode AD
    and torch.func.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        output = op("linear_relu", backend)(input, weight, bias)
        _save(ctx, (input, weight, bias, backend), output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        input, weight, output = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:3])
        if is_legacy_batched(grad_output):
            return (*_grads_of_masked(_masked(grad_output, output), input, weight, output_mask), None)
        if torch.is_grad_enabled():
            function = LinearReLUBackwardJvpFunction if transforms_active() else LinearReLUBackwardFunction
            grads = function.apply(grad_output, input, weight, output, *output_mask, ctx.backend)
        else:
            grads = op("linear_relu_backward", ctx.backend)(grad_output, input, weight, output, output_mask)
        return (*grads, None)


def _save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    input, weight, _, ctx.backend = inputs
    ctx.save_for_backward(input, weight, output)


class FusedLinearReLUJvpFunction(FusedLinearReLUFunction):
    """:class:`FusedLinearReLUFunction` in the ``setup_context`` form, with forward-mode
    AD (the pre-activation's tangent masked as the gradient is) and torch.func's vmap
    through the dispatcher ops' batching rules (generate_vmap_rule): what the public
    function calls under ``forward_ad`` or a torch.func transform."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        return op("linear_relu", backend)(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _save(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1], output)

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[torch.Tensor], weight_t: Optional[torch.Tensor],
            bias_t: Optional[torch.Tensor], _backend: None) -> torch.Tensor:
        input, weight, output = ctx.saved_tensors
        return _masked(affine_tangent(input, weight, input_t, weight_t, bias_t), output)


def affine_tangent(input: torch.Tensor, weight: torch.Tensor, input_t: Optional[torch.Tensor],
                   weight_t: Optional[torch.Tensor], bias_t: Optional[torch.Tensor]) -> torch.Tensor:
    """The tangent of ``input @ weight.T + bias`` (*, out_features) for the tangents
    given (None: zero) of its three operands: the product rule, term by term."""
    terms = []
    if input_t is not None:
        terms.append(torch.matmul(input_t, weight.t()))
    if weight_t is not None:
        terms.append(torch.matmul(input, weight_t.t()))
    tangent = terms[0] if terms else input.new_zeros((*input.shape[:-1], weight.shape[0]))
    for term in terms[1:]:
        tangent = tangent + term
    return tangent + bias_t if bias_t is not None else tangent


def _grads_of_masked(masked: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]):
    """(g W, g^T X, sum(g)) where asked for, from torch ops, for the masked upstream
    gradient g: the backward op's results, for a batch of gradients (see
    myext._batching.is_legacy_batched)."""
    out_features, in_features = weight.shape
    rows = math.prod(masked.shape[:-1])
    g = masked.reshape(rows, out_features)
    return (g.mm(weight).reshape(input.shape) if output_mask[0] else None,
            g.t().mm(input.reshape(rows, in_features)) if output_mask[1] else None,
            g.sum(0) if output_mask[2] else None)


def _masked(values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``values`` where the ReLU passed its input (output > 0), else 0: torch.relu's
    derivative, 0 at 0 too."""
    return torch.where(output > 0, values, torch.zeros_like(values))


class LinearReLUBackwardFunction(torch.autograd.Function):
    """The backward of Linear+ReLU as a differentiable function, for double backward
    and forward-over-reverse (torch.func.hessian).

    Its outputs (g W, g^T X, sum(g)) with g = grad_output * (output > 0) are linear in
    g, and the mask is piecewise constant in output, so their gradients are
    d/d grad_output = (gg_X W^T + X gg_W^T + gg_b) * mask, d/dX = g gg_W, d/dW = g^T gg_X,
    and their tangents the same products with the tangents in place of gg.
    """

    generate_vmap_rule = True

    # The output mask as three bools, not a list: torch.func's generated vmap rule for
    # jvp cannot take a list argument (it flattens it into three).
    @staticmethod
    def forward(grad_output, input, weight, output, want_input: bool, want_weight: bool, want_bias: bool,
                backend: str):
        return op("linear_relu_backward", backend)(grad_output, input, weight, output,
                                                   [want_input, want_weight, want_bias])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        grad_output, input, weight, output_, *mask, _ = inputs
        ctx.output_mask = mask
        ctx.save_for_backward(grad_output, input, weight, output_)
        ctx.save_for_forward(grad_output, input, weight, output_)

    @staticmethod
    def backward(ctx: Any, grad_grad_input, grad_grad_weight, grad_grad_bias):
        grad_output, input, weight, output = ctx.saved_tensors
        out_features, in_features = weight.shape
        grad_grad_output = _masked(affine_tangent(input, weight, grad_grad_input, grad_grad_weight, grad_grad_bias),
                                   output)
        rows = math.prod(output.shape[:-1])
        masked = _masked(grad_output, output).reshape(rows, out_features)
        grad_input = grad_weight = None
        if grad_grad_weight is not None and ctx.needs_input_grad[1]:
            grad_input = masked.mm(grad_grad_weight).reshape(input.shape)
        if grad_grad_input is not None and ctx.needs_input_grad[2]:
            grad_weight = masked.t().mm(grad_grad_input.reshape(rows, in_features))
        return grad_grad_output, grad_input, grad_weight, None, None, None, None, None


class LinearReLUBackwardJvpFunction(LinearReLUBackwardFunction):
    """:class:`LinearReLUBackwardFunction` with forward-mode AD (forward-over-reverse),
    apart for the reason :class:`FusedLinearReLUJvpFunction` is."""

    @staticmethod
    def jvp(ctx: Any, grad_output_t, input_t, weight_t, _output_t, *_constants):
        grad_output, input, weight, output = ctx.saved_tensors
        out_features, in_features = weight.shape
        rows = math.prod(output.shape[:-1])
        masked = _masked(grad_output, output).reshape(rows, out_features)
        masked_t = (_masked(grad_output_t, output).reshape(rows, out_features) if grad_output_t is not None
                    else None)
        x = input.reshape(rows, in_features)
        x_t = input_t.reshape(rows, in_features) if input_t is not None else None
        want_input, want_weight, want_bias = ctx.output_mask
        # d(g W) = dg W + g dW; d(g^T X) = dg^T X + g^T dX; d(sum g) = sum dg.
        grad_input_t = grad_weight_t = grad_bias_t = None
        if want_input:
            grad_input_t = _sum_of([masked_t.mm(weight) if masked_t is not None else None,
                                    masked.mm(weight_t) if weight_t is not None else None],
                                   lambda: torch.zeros_like(x)).reshape(input.shape)
        if want_weight:
            grad_weight_t = _sum_of([masked_t.t().mm(x) if masked_t is not None else None,
                                     masked.t().mm(x_t) if x_t is not None else None],
                                    lambda: torch.zeros_like(weight))
        if want_bias:
            grad_bias_t = masked_t.sum(0) if masked_t is not None else weight.new_zeros(out_features)
        return grad_input_t, grad_weight_t, grad_bias_t


def _sum_of(terms, zeros):
    """The sum of the terms that are not None, or ``zeros()`` if all are."""
    present = [t for t in terms if t is not None]
    if not present:
        return zeros()
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


# --------------------------------------------------------------------------- the public function

def linear_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Applies :math:`\mathrm{ReLU}(x W^T + b)` as one fused op.

    Gives the shapes and results of ``F.relu(F.linear(input, weight, bias))``.

    Args:
        input: ``(*, in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features)``, or ``None``.
        backend: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``; ``None`` picks
            ``$MYEXT_BACKEND`` or the best backend available for the tensors' device.

    Returns:
        ``(*, out_features)``.

    Example::

        >>> x, w, b = torch.randn(64, 784), torch.randn(128, 784), torch.randn(128)
        >>> myext.linear_relu(x, w, b).shape
        torch.Size([64, 128])
    """
    check_linear_relu(input, weight, bias)
    name = resolve_backend(backend, input.device, NAME)
    if name == "torch":
        return reference(input, weight, bias)
    if not needs_grad(input, weight, bias):
        # Nothing to differentiate: the op alone, without autograd.Function's overhead.
        return op("linear_relu", name)(input, weight, bias)
    function = FusedLinearReLUJvpFunction if transforms_active() else FusedLinearReLUFunction
    return function.apply(input, weight, bias, name)


# --------------------------------------------------------------------------- the spec

def reference(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(input @ weight.T + bias), from elementary torch ops: the executable spec."""
    # The bias goes inside the GEMM's sum (addmm), as in every backend: added to an
    # output already rounded to bfloat16, it would round twice and move pre-activations
    # near 0 across the ReLU's kink. torch.relu's gradient at exactly 0 is 0, as F.relu's
    # (clamp_min's would be 1).
    return torch.relu(affine(input, weight, bias))


def affine(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input @ weight.T + bias for input (*, in_features), the bias added inside the
    GEMM's sum (torch.addmm), from elementary ops: F.linear's result, written out."""
    if bias is None:
        return torch.matmul(input, weight.t())
    rows = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    return torch.addmm(bias, rows, weight.t()).reshape(*input.shape[:-1], weight.shape[0])


def _sample(shape: tuple[int, ...], out_features: int, device: str, bias: bool = True) -> registry.Sample:
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    w = torch.randn(out_features, shape[-1], dtype=torch.float64, device=device)
    b = torch.randn(out_features, dtype=torch.float64, device=device) if bias else None
    args = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    return registry.Sample(args, name=f"{tuple(shape)}->{out_features}" + ("" if bias else " no bias"))


def samples(device: str) -> list[registry.Sample]:
    """1-d, 2-d and 3-d inputs, with and without bias, and transposed operands with a strided bias."""
    transposed = (torch.randn(5, 4, dtype=torch.float64, device=device).t().requires_grad_(),
                  torch.randn(5, 3, dtype=torch.float64, device=device).t().requires_grad_(),
                  torch.randn(6, dtype=torch.float64, device=device)[::2].requires_grad_())
    return [_sample((5,), 3, device), _sample((4, 5), 3, device, bias=False), _sample((2, 3, 5), 4, device),
            registry.Sample(transposed, name="transposed (4, 5)->3, strided bias")]


def accuracy_samples(device: str) -> list[registry.Sample]:
    return [_sample((5,), 40, device), _sample((33, 70), 40, device), _sample((3, 17, 70), 40, device)]


def eager(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The PyTorch baseline of myext.linear_relu."""
    return F.relu(F.linear(input, weight, bias))


def benchmark_inputs(N: int, K: int, M: int, *, device: torch.device | str, dtype: torch.dtype,
                     requires_grad: bool) -> dict[str, torch.Tensor]:
    """Input, weight and bias initialised like nn.Linear (so about half the outputs pass
    the ReLU), and for the backward an upstream gradient of the output's shape."""
    bound = 1.0 / math.sqrt(K)
    tensors = {
        "input": torch.randn(N, K, device=device, dtype=dtype),
        "weight": torch.empty(M, K, device=device, dtype=dtype).uniform_(-bound, bound),
        "bias": torch.empty(M, device=device, dtype=dtype).uniform_(-bound, bound),
    }
    for t in tensors.values():
        t.requires_grad_(requires_grad)
    if requires_grad:
        tensors["grad_output"] = torch.randn(N, M, device=device, dtype=dtype)
    return tensors


def work(shape, backward: bool, dtype: torch.dtype) -> tuple[float, str]:
    """FLOPs: 2NKM forward; forward+backward adds the input and weight gradients."""
    flops = 2 * shape["N"] * shape["K"] * shape["M"]
    return (3 * flops if backward else flops), "GFLOP/s"


SPEC = registry.register(registry.OpSpec(
    name=NAME,
    function=linear_relu,
    reference=reference,
    baseline=eager,
    dispatcher_ops=("linear_relu", "linear_relu_backward"),
    fakes={"linear_relu": linear_relu_fake, "linear_relu_backward": linear_relu_backward_fake},
    samples=samples,
    accuracy_samples=accuracy_samples,
    benchmark=registry.Benchmark(
        # The article's SimpleNet layer 784->128 and an MLP layer 1024->4096, over the batch.
        sweep=[("784->128", [dict(N=n, K=784, M=128) for n in (64, 256, 1024, 4096)]),
               ("1024->4096", [dict(N=n, K=1024, M=4096) for n in (256, 512, 1024, 2048)])],
        quick_sweep=[("32->16", [dict(N=n, K=32, M=16) for n in (8, 64)])],
        # SimpleNet's layer at batch 64, 256 and 4096, and the MLP layer at batch 2048.
        cases=[dict(N=64, K=784, M=128), dict(N=256, K=784, M=128), dict(N=4096, K=784, M=128),
               dict(N=2048, K=1024, M=4096)],
        gpu_sweep=[("4096->4096", [dict(N=4096, K=4096, M=4096)]),
                   ("784->128", [dict(N=n, K=784, M=128) for n in (256, 4096)]),
                   ("1024->4096", [dict(N=2048, K=1024, M=4096)])],
        x="N",
        inputs=benchmark_inputs,
        eager=eager,
        work=work,
        label=lambda shape: f"{shape['N']}x{shape['K']}->{shape['M']}",
    ),
))
