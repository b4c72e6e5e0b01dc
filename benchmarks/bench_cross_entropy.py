"""cross_entropy against F.cross_entropy eager and compiled, N = 4096 rows of float32 logits.

Passes: forward; forward+backward with the logits a leaf tensor; and forward+backward with
the logits produced in the same step (``z = x * 1.0``, then the loss, then the gradient
with respect to ``x``). In that last pass the producing op runs eagerly for every provider
and only the loss is compiled, as when the logits come from a matmul torch.compile cannot
fuse into the loss. The same group also times myext with ``inplace_backward=True``, which
writes the gradient over ``z`` instead of a new buffer (backends with such a kernel only).

C = 128256 (Llama-3's vocabulary) makes 2.1 GB of logits and takes seconds a call: it runs
a few rounds, and skips the produced-logits passes, whose eager baseline would hold about
six N x C buffers (13 GB) at once.
"""

import pytest
import torch

import myext
from myext.backends import has_inplace_cross_entropy_backward
from myext.bench import cross_entropy_inputs, make_call, op_impl

N = 4096
CLASSES = [10, 32000, 128256]
LARGE = 128256
PASSES = ["fwd", "fwd+bwd", "fwd+bwd produced", "fwd+bwd produced inplace"]


def produced_logits_call(loss_fn, tensors):
    """A step whose logits are made in it: z = x * 1.0, the loss of z, then d loss / d x."""
    x, target = tensors["input"], tensors["target"]

    def call() -> None:
        torch.autograd.grad(loss_fn(x * 1.0, target), (x,))

    return call


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("classes", CLASSES)
def test_cross_entropy(run_benchmark, device, provider, classes, pass_):
    if pass_.startswith("fwd+bwd produced") and classes == LARGE:
        pytest.skip("about 13 GB for the eager baseline; see the module docstring")
    backward = pass_ != "fwd"
    tensors = cross_entropy_inputs(N, classes, device=device, dtype=torch.float32, requires_grad=backward)
    group = f"cross_entropy {device} {N}x{classes} {pass_}"
    if pass_ == "fwd+bwd produced inplace":
        backend = provider.removeprefix("myext-")
        if not provider.startswith("myext-") or not has_inplace_cross_entropy_backward(backend, torch.device(device)):
            pytest.skip("inplace_backward is myext's, and only some backends have its kernel")
        call = produced_logits_call(
            lambda z, t: myext.cross_entropy(z, t, backend=backend, inplace_backward=True), tensors)
        group = group.removesuffix(" inplace")  # shown beside the out-of-place providers
    elif pass_ == "fwd+bwd produced":
        call = produced_logits_call(op_impl("cross_entropy", provider), tensors)
    else:
        call = make_call("cross_entropy", op_impl("cross_entropy", provider), tensors, backward)
    run_benchmark(call, device, group=group, rounds=3 if classes == LARGE else None)
