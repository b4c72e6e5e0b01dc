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
from ..backends import op, resolve_backend
from .._validation import check_float_dtype, check_same, check_tensor, needs_grad

__all__ = ["FusedLinearReLUFunction", "LinearReLUBackwardFunction", "linear_relu", "reference"]

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
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        output = op("linear_relu", backend)(input, weight, bias)
        ctx.backend = backend
        ctx.save_for_backward(input, weight, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        input, weight, output = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():
            grads = LinearReLUBackwardFunction.apply(grad_output, input, weight, output, output_mask, ctx.backend)
        else:
            grads = op("linear_relu_backward", ctx.backend)(grad_output, input, weight, output, output_mask)
        return (*grads, None)


class LinearReLUBackwardFunction(torch.autograd.Function):
    """The backward of Linear+ReLU as a differentiable function, for double backward.

    Its outputs (g W, g^T X, sum(g)) with g = grad_output * (output > 0) are linear in
    g, and the mask is piecewise constant in output, so their gradients are
    d/d grad_output = (gg_X W^T + X gg_W^T + gg_b) * mask, d/dX = g gg_W, d/dW = g^T gg_X.
    """

    @staticmethod
    def forward(ctx: Any, grad_output, input, weight, output, output_mask, backend):
        ctx.save_for_backward(grad_output, input, weight, output)
        return op("linear_relu_backward", backend)(grad_output, input, weight, output, output_mask)

    @staticmethod
    def backward(ctx: Any, grad_grad_input, grad_grad_weight, grad_grad_bias):
        grad_output, input, weight, output = ctx.saved_tensors
        mask = output > 0
        out_features, in_features = weight.shape
        grad_pre = torch.zeros_like(output)
        if grad_grad_input is not None:
            grad_pre = grad_pre + torch.matmul(grad_grad_input, weight.t())
        if grad_grad_weight is not None:
            grad_pre = grad_pre + torch.matmul(input, grad_grad_weight.t())
        if grad_grad_bias is not None:
            grad_pre = grad_pre + grad_grad_bias
        grad_grad_output = torch.where(mask, grad_pre, torch.zeros_like(grad_pre))

        rows = math.prod(output.shape[:-1])
        masked = torch.where(mask, grad_output, torch.zeros_like(grad_output)).reshape(rows, out_features)
        grad_input = grad_weight = None
        if grad_grad_weight is not None and ctx.needs_input_grad[1]:
            grad_input = masked.mm(grad_grad_weight).reshape(input.shape)
        if grad_grad_input is not None and ctx.needs_input_grad[2]:
            grad_weight = masked.t().mm(grad_grad_input.reshape(rows, in_features))
        return grad_grad_output, grad_input, grad_weight, None, None, None


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
    return FusedLinearReLUFunction.apply(input, weight, bias, name)


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
