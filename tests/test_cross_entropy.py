"""myext.cross_entropy on every backend, against the plain-PyTorch reference and F.cross_entropy."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import myext

# Tests taking backend and device run on every backend of the op (conftest.py).
OP = "cross_entropy"
REDUCTIONS = ["none", "mean", "sum"]


def make_case(shape, target_kind="class", weighted=False, dtype=torch.float64, device="cpu", ignore=True,
              requires_grad=True, scale=1.0):
    """Logits of `shape` ((C), (N, C) or (N, C, d1, ...)) and a target, with some ignored rows."""
    classes = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    batch = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
    if target_kind == "class":
        target = torch.randint(0, classes, batch, device=device)
        if ignore and target.numel() > 1:
            target.view(-1)[1] = -100
    else:
        target = torch.softmax(torch.randn(*shape, dtype=torch.float64), dim=0 if len(shape) == 1 else 1)
        target = target.to(dtype=dtype, device=device)
    weight = torch.rand(classes, dtype=torch.float64).add(0.5).to(dtype=dtype, device=device) if weighted else None
    x.requires_grad_(requires_grad)
    return x, target, weight


# Tolerances against F.cross_entropy. float32: the same float32 math in another order,
# over up to C = 5000 terms. bfloat16: our kernels compute in float32 and round once,
# while PyTorch rounds its bfloat16 log_softmax; both sit within a few bf16 ulps
# (2**-8 relative) of the float32 result, which is what we compare against.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
AGREEMENT_CASES = [
    (shape, kind, weighted, smoothing, reduction)
    for shape, kind, (weighted, smoothing), reduction in itertools.product(
        [(37, 70), (3, 5000), (2, 11, 3, 4)], ["class", "prob"], [(False, 0.0), (True, 0.1)], REDUCTIONS)
]


@pytest.mark.compiled_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kind,weighted,smoothing,reduction", AGREEMENT_CASES,
                         ids=["-".join(map(str, c)) for c in AGREEMENT_CASES])
def test_matches_functional(backend, device, dtype, shape, kind, weighted, smoothing, reduction):
    x, target, weight = make_case(shape, kind, weighted, dtype=dtype, device=device, scale=3.0)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    loss = myext.cross_entropy(x, target, weight, **kwargs, backend=backend)
    grad_out = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_out)

    # The spec in float32: PyTorch on the same values, upcast.
    x_ref = x.detach().float().requires_grad_()
    target_ref = target.float() if kind == "prob" else target
    loss_ref = F.cross_entropy(x_ref, target_ref, weight.float() if weighted else None, **kwargs)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref, grad_out.float())

    assert loss.dtype == dtype and loss.shape == loss_ref.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    torch.testing.assert_close(loss.float(), loss_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(grad.float(), grad_ref, **TOLERANCES[dtype])


# The cpp forward takes rows of up to 32 classes a vector's width of rows at a time,
# one lane per row (8 rows in float64, 16 in float32), and the rows left over one by
# one; 19 rows exercise both, and 33 classes only the second.
@pytest.mark.parametrize("classes", [1, 10, 32, 33])
def test_cpp_rows_of_few_classes(classes):
    x, target, weight = make_case((19, classes), "class", weighted=True)
    target[3] = -100

    def fn(x, weight):
        return myext.cross_entropy(x, target, weight, label_smoothing=0.1, reduction="none", backend="cpp")

    assert gradcheck(lambda x: fn(x, weight), (x,))
    torch.testing.assert_close(fn(x, weight), F.cross_entropy(x, target, weight, label_smoothing=0.1, reduction="none"))
    x32, weight32 = x.detach().float(), weight.float()
    expected32 = F.cross_entropy(x32, target, weight32, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(fn(x32, weight32), expected32, rtol=1e-5, atol=1e-6)


@pytest.mark.compiled_backends
def test_reference_is_the_spec(backend, device):
    for kind, reduction in itertools.product(["class", "prob"], REDUCTIONS):
        x, target, weight = make_case((6, 9), kind, weighted=True, device=device)
        args = dict(reduction=reduction, label_smoothing=0.25)
        ref = myext.cross_entropy(x, target, weight, **args, backend="torch")
        torch.testing.assert_close(ref, F.cross_entropy(x, target, weight, **args))
        torch.testing.assert_close(myext.cross_entropy(x, target, weight, **args, backend=backend), ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_ignored_batch(backend, device, reduction, smoothing):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    target = torch.full((3,), -100, device=device)
    loss = myext.cross_entropy(x, target, reduction=reduction, label_smoothing=smoothing, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x_ref = x.detach().requires_grad_()
    loss_ref = F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=smoothing)
    (grad_ref,) = torch.autograd.grad(loss_ref.sum(), x_ref)
    torch.testing.assert_close(loss, loss_ref, equal_nan=True)
    torch.testing.assert_close(grad, grad_ref, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, device, reduction):
    x = torch.randn(0, 4, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64, device=device)
    loss = myext.cross_entropy(x, target, reduction=reduction, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, reduction=reduction), equal_nan=True)


@pytest.mark.compiled_backends
def test_extreme_logits(backend, device):
    # Large spreads, a -inf logit, and a constant row far from zero.
    x = torch.randn(4, 300, device=device) * 1e3
    x[0, 7] = float("-inf")
    x[1] = -1e4
    target = torch.tensor([3, 4, 5, 6], device=device)
    x.requires_grad_()
    loss = myext.cross_entropy(x, target, reduction="none", label_smoothing=0.0, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = x.detach().double().requires_grad_()
    loss64 = F.cross_entropy(x64, target, reduction="none")
    (grad64,) = torch.autograd.grad(loss64.sum(), x64)
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), target, reduction="none"))
    # A kernel that keeps only the log-sum-exp computes p = exp(x - lse): rounding
    # x - lse in float32 costs up to |lse| * 2**-24 in the exponent, so p carries that
    # relative error (as in Liger-Kernel and flash-attention); hence rows near 1e4, not 1e30.
    lse = torch.logsumexp(x64.detach(), dim=1, keepdim=True)
    allowed = 4 * 2**-24 * lse.abs() * torch.softmax(x64.detach(), dim=1) + 1e-6
    excess = (grad.double() - grad64).abs() - allowed
    assert (excess <= 0).all(), f"gradient off by {excess.max().item():.3g} beyond |lse|-relative rounding"


def _bad(**changes):
    return changes


BAD_INPUTS = [
    (_bad(input=lambda x: x.long()), TypeError, "input must have a floating dtype"),
    (_bad(input=lambda x: x.sum()), ValueError, "input must be"),
    (_bad(input=lambda x: x.tolist()), TypeError, "input must be a torch.Tensor"),
    (_bad(target=lambda t: t.int()), TypeError, "target must hold class indices as int64"),
    (_bad(target=lambda t: t[:2]), ValueError, "target of class indices must have shape"),
    (_bad(target=lambda t: t.double()), ValueError, "probabilities and must have the input's shape"),
    (_bad(target=lambda t: torch.where(t == 1, 7, t)), IndexError, "class index 7"),
    (_bad(target=lambda t: torch.where(t == 1, -3, t)), IndexError, "class index -3"),
    (_bad(target=lambda t: t.to("meta")), ValueError, "expected all tensors on one device"),
    (_bad(weight=lambda w: w[:3]), ValueError, "weight must have one entry per class"),
    (_bad(weight=lambda w: w.double()), TypeError, "weight has dtype"),
    (_bad(weight=lambda w: w.to("meta")), ValueError, "expected all tensors on one device"),
    (_bad(weight=lambda w: w.requires_grad_()), ValueError, "weight requires grad"),
    (_bad(target=lambda t: torch.rand(4, 5, device=t.device), ignore_index=0), ValueError,
     "ignore_index .* applies to class-index targets only"),
    (_bad(reduction="avg"), ValueError, "reduction must be one of"),
    (_bad(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (_bad(label_smoothing=-0.1), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (_bad(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    (_bad(backend="fortran"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input(backend, device, changes, error, message):
    x = torch.randn(4, 5, device=device)
    target = torch.tensor([0, 1, 2, 1], device=device)
    args = dict(input=x, target=target, weight=torch.ones(5, device=device), ignore_index=-100,
                reduction="mean", label_smoothing=0.0, backend=backend)
    for key, change in changes.items():
        args[key] = change(args[key]) if callable(change) else change
    before = (x.clone(), target.clone())
    with pytest.raises(error, match=message):
        myext.cross_entropy(**args)
    assert torch.equal(x, before[0]) and torch.equal(target, before[1])


def test_backend_not_available_for_device():
    x, target, _ = make_case((4, 5), dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        myext.cross_entropy(x, target, backend="cuda")


def test_out_of_range_target_fails_in_kernel():
    """The C++ kernel checks class indices itself, for callers (like compiled graphs) that skip Python's check."""
    x = torch.randn(3, 4)
    ops = myext.backends.kernels("cpp")
    with pytest.raises(IndexError, match="class index 9"):
        ops.cross_entropy_forward(x, torch.tensor([0, 9, 1]), None, 1, -100, 0.0)


@pytest.mark.parametrize("kind", ["class", "prob"])
def test_inplace_backward_gives_the_same_gradients(backend, device, kind):
    x, target, weight = make_case((6, 7), kind, weighted=True, dtype=torch.float64, device=device)
    if kind == "prob":
        target.requires_grad_()
    grads = []
    for inplace in (False, True):
        logits = x * 2.0
        loss = myext.cross_entropy(logits, target, weight, label_smoothing=0.1, backend=backend,
                                   inplace_backward=inplace)
        grads.append(torch.autograd.grad(loss, (x, target) if kind == "prob" else (x,)))
    for g_out_of_place, g_inplace in zip(*grads):
        torch.testing.assert_close(g_inplace, g_out_of_place)


def test_inplace_backward_overwrites_only_what_nothing_else_needs(backend, device):
    """Logits saved by another node: autograd's version check raises, never a wrong gradient."""
    x = torch.randn(4, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=device)
    logits = x * 2.0
    # The square saves the logits and, created earlier, runs its backward after ours.
    loss = (logits ** 2).sum() + myext.cross_entropy(logits, target, backend=backend, inplace_backward=True)
    if myext.backends.has_capability("cross_entropy", "inplace_backward", backend, x.device):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    else:
        loss.backward()
        x_ref = x.detach().requires_grad_()
        logits_ref = x_ref * 2.0
        ((logits_ref ** 2).sum() + F.cross_entropy(logits_ref, target)).backward()
        torch.testing.assert_close(x.grad, x_ref.grad)


def test_inplace_backward_refuses_a_leaf(backend, device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite input"):
        myext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device), backend=backend, inplace_backward=True)


@pytest.mark.compiled_backends
def test_inplace_backward_compiles(backend, device):
    torch._dynamo.reset()
    x = torch.randn(6, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, -100], device=device)

    def step(x):
        return myext.cross_entropy(x * 3.0, target, backend=backend, inplace_backward=True)

    (grad,) = torch.autograd.grad(step(x), x)
    (grad_c,) = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), x)
    x_ref = x.detach().requires_grad_()
    F.cross_entropy(x_ref * 3.0, target).backward()
    torch.testing.assert_close(grad, x_ref.grad)
    torch.testing.assert_close(grad_c, x_ref.grad)


def test_inplace_op_opcheck():
    ops = myext.backends.kernels("cpp")
    x = torch.randn(4, 7, dtype=torch.float64)
    target = torch.tensor([1, 6, -100, 0])
    loss, lse, total_weight = ops.cross_entropy_forward(x, target, None, 1, -100, 0.1)
    torch.library.opcheck(torch.ops.myext.cross_entropy_backward_,
                          (torch.ones(()), x.clone(), target, None, lse, total_weight, 1, -100, 0.1))


