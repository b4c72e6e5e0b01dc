"""linear_relu against F.relu(F.linear(...)) eager and compiled, forward and forward+backward.

The sizes are the op's registered benchmark cases (myext/ops/linear_relu.py): the
article's SimpleNet layer 784 -> 128 at batch 64, 256 and 4096, and an MLP layer
1024 -> 4096 at batch 2048. Forward+backward computes all three gradients (input,
weight, bias) with ``torch.autograd.grad`` from a fixed upstream gradient.
"""

OP = "linear_relu"


def test_linear_relu(run_case, case, device, provider):
    run_case(OP, case, device, provider)
