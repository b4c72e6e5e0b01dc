"""cross_entropy against F.cross_entropy eager and compiled, N = 4096 rows of float32 logits.

Passes: the op's registered cases (myext/ops/cross_entropy.py), forward and
forward+backward with the logits a leaf tensor; and forward+backward with the logits
produced in the same step (``z = x * 1.0``, then the loss, then the gradient with
respect to ``x``). In that last pass the producing op runs eagerly for every provider
and only the loss is compiled, as when the logits come from a matmul torch.compile
cannot fuse into the loss. The same group also times myext with
``inplace_backward=True``, which writes the gradient over ``z`` instead of a new buffer
(backends with such a kernel only).

C = 128256 (Llama-3's vocabulary) makes 2.1 GB of logits and takes seconds a call: it
runs a few rounds, and skips the produced-logits passes, whose eager baseline would
hold about six N x C buffers (13 GB) at once.
"""

import pytest
import torch

import myext
from myext import registry
from myext.backends import has_capability
from myext.bench import inputs, op_impl

OP = "cross_entropy"
N = 4096
PRODUCED_CLASSES = [10, 32000]


def test_cross_entropy(run_case, case, device, provider):
    run_case(OP, case, device, provider)


def produced_logits_call(loss_fn, tensors):
    """A step whose logits are made in it: z = x * 1.0, the loss of z, then d loss / d x."""
    x, target = tensors["input"], tensors["target"]

    def call() -> None:
        torch.autograd.grad(loss_fn(x * 1.0, target), (x,))

    return call


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("classes", PRODUCED_CLASSES)
def test_cross_entropy_produced_logits(run_benchmark, device, provider, classes, inplace):
    tensors = inputs(OP, dict(N=N, C=classes), device=device, dtype=torch.float32, requires_grad=True)
    if inplace:
        backend = provider.removeprefix("myext-")
        if not provider.startswith("myext-") or not has_capability(OP, "inplace_backward", backend,
                                                                    torch.device(device)):
            pytest.skip("inplace_backward is myext's, and only some backends have its kernel")
        loss_fn = lambda z, t: myext.cross_entropy(z, t, backend=backend, inplace_backward=True)  # noqa: E731
    else:
        loss_fn = op_impl(OP, provider)
    # Shown beside the out-of-place providers.
    run_benchmark(produced_logits_call(loss_fn, tensors), device,
                  group=f"{OP} {device} {N}x{classes} fwd+bwd produced")


@pytest.mark.parametrize("where", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("shape", registry.get(OP).benchmark.cases, ids=registry.get(OP).benchmark.label)
def test_read_floor(run_benchmark, where, shape):
    """A sum over the same logits, in each forward group: the read rate the forward
    pass is measured against (issue 12 asks for 60% of it)."""
    logits = inputs(OP, shape, device=where, dtype=torch.float32, requires_grad=False)["input"]
    run_benchmark(logits.sum, where, group=f"{OP} {where} {registry.get(OP).benchmark.label(shape)} fwd")
