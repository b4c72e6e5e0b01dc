"""linear_relu against F.relu(F.linear(...)) eager and compiled, forward and forward+backward.

Shapes (batch x in -> out): the article's SimpleNet layer 784 -> 128 at batch 64, 256 and
4096, and an MLP layer 1024 -> 4096 at batch 2048. Forward+backward computes all three
gradients (input, weight, bias) with ``torch.autograd.grad`` from a fixed upstream gradient.
"""

import pytest
import torch

from myext.bench import PASSES, linear_relu_inputs, make_call, op_impl

SHAPES = [(64, 784, 128), (256, 784, 128), (4096, 784, 128), (2048, 1024, 4096)]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_linear_relu(run_benchmark, device, provider, shape, pass_):
    n, k, m = shape
    backward = pass_ == "fwd+bwd"
    tensors = linear_relu_inputs(n, k, m, device=device, dtype=torch.float32, requires_grad=backward)
    call = make_call("linear_relu", op_impl("linear_relu", provider), tensors, backward)
    run_benchmark(call, device, group=f"linear_relu {device} {n}x{k}->{m} {pass_}")
