"""myext.cross_entropy on every backend, against the plain-PyTorch reference and F.cross_entropy."""

import decimal
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import myext
from myext.distributed import VocabParallel, split_range

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


def _exact_loss_and_grad(row, target):
    """Loss and gradient of one row against a class index, in 60-digit decimals."""
    with decimal.localcontext() as context:
        context.prec = 60
        x = [decimal.Decimal(float(v)) for v in row]
        top = max(x)
        total = sum((v - top).exp() for v in x)
        lse = top + total.ln()
        return float(lse - x[target]), [float((v - lse).exp()) - (c == target) for c, v in enumerate(x)]


# Rows whose logits spread over several scales, a pair of close large logits among them.
SCALES = [1.0, 1e3, 3e4, 1e6]


@pytest.mark.compiled_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_as_precise_as_pytorch_at_every_scale(backend, device, dtype, scale):
    """The loss and gradient are as precise as PyTorch's at any scale of the logits: backward's
    softmax comes from each row's max and log-sum kept apart (a rounded log-sum-exp alone
    would lose |lse| * eps). Ground truth in 60-digit decimals."""
    x = torch.randn(5, 7, dtype=torch.float64) * scale
    x[0, :3] = torch.tensor([1.0, 1.0 - 1e-2, 0.0], dtype=torch.float64) * scale
    x[1, 1] = x[1, 0] - 10
    target = torch.tensor([1, 0, 3, 6, 2])
    x = x.to(dtype=dtype, device=device).requires_grad_()
    loss = myext.cross_entropy(x, target.to(device), reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x_torch = x.detach().requires_grad_()
    loss_torch = F.cross_entropy(x_torch, target.to(device), reduction="none")
    (grad_torch,) = torch.autograd.grad(loss_torch.sum(), x_torch)
    exact = [_exact_loss_and_grad(row.tolist(), t) for row, t in zip(x.detach().cpu(), target.tolist())]
    exact_loss = torch.tensor([e[0] for e in exact], dtype=torch.float64)
    exact_grad = torch.tensor([e[1] for e in exact], dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    for what, ours, theirs, truth in (("loss", loss, loss_torch, exact_loss), ("grad", grad, grad_torch, exact_grad)):
        error = (ours.detach().cpu().double() - truth).abs() / truth.abs().clamp_min(1)
        torch_error = (theirs.detach().cpu().double() - truth).abs() / truth.abs().clamp_min(1)
        assert (error <= 2 * torch_error + eps).all(), (
            f"{what}: relative error {error.max():.3g}, PyTorch's {torch_error.max():.3g}")


def _against_pytorch(backend, device, x, target, **kwargs):
    """Loss and gradient of ours and of F.cross_entropy, NaN for NaN."""
    x = x.to(device).requires_grad_()
    loss = myext.cross_entropy(x, target.to(device), **kwargs, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x_ref = x.detach().requires_grad_()
    loss_ref = F.cross_entropy(x_ref, target.to(device), **kwargs)
    (grad_ref,) = torch.autograd.grad(loss_ref.sum(), x_ref)
    torch.testing.assert_close(loss, loss_ref, equal_nan=True)
    torch.testing.assert_close(grad, grad_ref, equal_nan=True)
    return loss, grad


INF, NAN = float("inf"), float("nan")
SPECIAL_VALUES = {
    # A NaN logit makes its row's loss and gradient NaN, and only its row's.
    "nan-logit": (torch.tensor([[0.0, NAN, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 2]), {}),
    "nan-logit-smoothed": (torch.tensor([[0.0, NAN, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 2]),
                           dict(label_smoothing=0.1)),
    # A -inf logit that is not the target: finite without smoothing, inf with it.
    "minus-inf-other": (torch.tensor([[0.0, -INF, 1.0]]), torch.tensor([0]), {}),
    "minus-inf-other-smoothed": (torch.tensor([[0.0, -INF, 1.0]]), torch.tensor([0]), dict(label_smoothing=0.1)),
    # The target's logit -inf: an infinite loss.
    "minus-inf-target": (torch.tensor([[0.0, -INF, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([1, 0]), {}),
    # +inf somewhere: NaN, as in PyTorch.
    "plus-inf": (torch.tensor([[0.0, INF, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 1]), {}),
    # A NaN weight of a class no row targets counts only with smoothing.
    "nan-weight-untargeted": (torch.randn(3, 4), torch.tensor([0, 1, 3]),
                              dict(weight=torch.tensor([1.0, 2.0, NAN, 0.5]))),
    "nan-weight-untargeted-smoothed": (torch.randn(3, 4), torch.tensor([0, 1, 3]),
                                       dict(weight=torch.tensor([1.0, 2.0, NAN, 0.5]), label_smoothing=0.2)),
    # A mean whose divisor is 0 is nan, with smoothing too (PyTorch's nll term is 0 / 0).
    "mean-of-no-weight-smoothed": (torch.randn(3, 4), torch.tensor([1, 1, 2]),
                                   dict(weight=torch.tensor([1.0, 0.0, 2.0, 3.0]), ignore_index=2,
                                        label_smoothing=0.3)),
}


@pytest.mark.parametrize("case", SPECIAL_VALUES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_special_values_as_pytorch(backend, device, case, reduction):
    x, target, kwargs = SPECIAL_VALUES[case]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _against_pytorch(backend, device, x.clone(), target, reduction=reduction, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponentials_over_their_whole_range(backend, device, dtype):
    """Rows long enough for the vector loops and several online-softmax blocks, their
    logits spread from the max down past where exp underflows, with -inf among them:
    the softmax (the gradient of the summed loss, less the target's 1) within a few
    ulp of float64's wherever it is a normal number, exactly 0 at -inf and below
    float's range, and the loss as precise."""
    classes = 5000
    spread = torch.linspace(0.0, -120.0, classes, dtype=torch.float64)
    rows = torch.stack([spread, spread.flip(0), spread[torch.randperm(classes)], spread * 0.01])
    rows[:, 7::97] = -math.inf
    rows[3, 4000] = 30.0
    target = torch.tensor([0, 17, 2500, 4000])
    x = rows.to(device=device, dtype=dtype).requires_grad_()
    loss = myext.cross_entropy(x, target.to(device), reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    exact = rows.to(device)
    softmax = torch.softmax(exact, dim=1)
    expected_grad = softmax - F.one_hot(target.to(device), classes).to(torch.float64)
    expected_loss = F.cross_entropy(exact, target.to(device), reduction="sum")
    tiny = torch.finfo(dtype).tiny
    is_target = F.one_hot(target.to(device), classes).bool()
    normal = (softmax > tiny) & ~is_target
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), expected_loss, rtol=4 * ulp, atol=0)
    # exp(y) of a y rounded to the dtype is off by |y| ulp before any error of exp's own:
    # y = x - lse, the exponent of each softmax element.
    exponent = (exact - torch.logsumexp(exact, dim=1, keepdim=True)).abs()
    relative = (grad.double() - expected_grad).abs() / expected_grad.abs()
    assert (relative[normal] <= (8 + exponent[normal]) * ulp).all(), (relative / exponent.add(8))[normal].max() / ulp
    # g = p - 1 at the target. dg = dp: g carries p times p's relative error, held above to
    # (8 + |y|) ulp (exp's error, y's rounding and the rounding of the row's sum, order-dependent:
    # the op's and torch.softmax's sums near 1 in row 3 differ by 2 ulp under ATen's AVX2 order,
    # 0 under its AVX-512 one). Forming p - 1 adds, relative to |g|: 1/2 ulp for the reference's
    # p - 1; for the op's, at most Kahan's expm1 (u - 1) v / log(u) of the Triton kernel (the
    # C++ op's std::expm1, 1 ulp, and the torch op's one rounding are less): 3 roundings (3/2),
    # log's error and half of exp's (u's error cancels to at most half in the quotient, v <= 0).
    # NumPy's exp and log (the interpreter's) are within 1 ulp in float64 on every ISA (Tang's
    # AVX-512 ones: 0.72 and 0.62 measured; glibc's elsewhere: 0.51), 3 and 4 in float32 (2.54, 3.10).
    exp_ulp, log_ulp = (1, 1) if dtype == torch.float64 else (3, 4)
    forming_ulp = 1 / 2 + 3 / 2 + log_ulp + exp_ulp / 2
    p_t, g_t, y_t = softmax[is_target], expected_grad[is_target], exponent[is_target]
    target_error = (grad.double()[is_target] - g_t).abs()
    target_bound = (p_t * (8 + y_t) + forming_ulp * g_t.abs()) * ulp
    assert (target_error <= target_bound).all(), (target_error / target_bound).max().item()
    assert (grad[exact == -math.inf] == 0).all()
    # under a quarter of the dtype's smallest subnormal: 0
    assert (grad[(softmax < tiny * ulp / 4) & ~is_target] == 0).all()


@pytest.mark.parametrize("kind", ["class", "prob"])
def test_near_zero_loss_stays_zero(backend, device, kind):
    """Logits far from zero and a target on the largest: the loss is 0 as PyTorch's, not the
    difference of two large terms (-1.18e-05 before, on cpp)."""
    x = torch.tensor([[-1439.0, -807.0]])
    if kind == "class":
        target, kwargs = torch.tensor([1]), dict(label_smoothing=0.0)
    else:
        target, kwargs = torch.tensor([[0.0882, 0.9118]]), dict(weight=torch.tensor([0.0, 1.0], device=device))
    loss, _ = _against_pytorch(backend, device, x, target, reduction="sum", **kwargs)
    assert loss.item() == 0


def test_uint8_class_indices(backend, device):
    x, target, weight = make_case((5, 6), "class", weighted=True, dtype=torch.float32, device=device, ignore=False)
    expected = myext.cross_entropy(x, target, weight, backend=backend)
    torch.testing.assert_close(myext.cross_entropy(x, target.to(torch.uint8), weight, backend=backend), expected)


def test_reference_ignores_smoothing_terms_it_does_not_use():
    """The reference leaves out the smoothing term when smoothing is 0: a -inf logit must
    not make it 0 * inf = nan."""
    x = torch.tensor([[0.0, -INF, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = myext.reference.cross_entropy(x, torch.tensor([0]))
    torch.testing.assert_close(loss, F.cross_entropy(x, torch.tensor([0])))


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
        ops.cross_entropy_forward(x, torch.tensor([0, 9, 1]), None, None, 1, -100, 0.0, 0.0, 0.0, 1.0, False)


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


@pytest.mark.compiled_backends
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_target_gradient_compiles(backend, device, reduction):
    torch._dynamo.reset()
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64, device=device), dim=1).requires_grad_()
    weight = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    upstream = torch.randn(5 if reduction == "none" else (), dtype=torch.float64, device=device)

    def step(x, q):
        return myext.cross_entropy(x, q, weight=weight, reduction=reduction, label_smoothing=0.1, softcap=2.0,
                                   backend=backend)

    got = torch.autograd.grad(torch.compile(step, fullgraph=True)(x, q), (x, q), upstream)
    want = torch.autograd.grad(myext.reference.cross_entropy(x, q, weight, reduction=reduction,
                                                             label_smoothing=0.1, softcap=2.0), (x, q), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_inplace_op_opcheck():
    ops = myext.backends.kernels("cpp")
    x = torch.randn(4, 7, dtype=torch.float64)
    target = torch.tensor([1, 6, -100, 0])
    loss, row_max, row_log_sum, _, total_weight, _ = ops.cross_entropy_forward(x, target, None, None, 1, -100, 0.1,
                                                                               1e-3, 0.0, 1.0, False)
    torch.library.opcheck(torch.ops.myext.cross_entropy_backward_,
                          (torch.ones(()), x.clone(), target, None, None, row_max, row_log_sum, total_weight, None,
                           None, None, 1, -100, 0.1, 1e-3, 0.0, 1.0, False))


# Direct calls of the dispatcher ops with arguments the Python layer refuses (the ops
# are public): each must raise, naming the argument, never crash, read out of bounds
# or return an answer. Each runs in a worker process of its own (conftest.isolated).
DIRECT_SETUP = """
x = torch.randn(4, 5, device=dev)
t = torch.tensor([1, 2, 0, 4], device=dev)
q = torch.softmax(torch.randn(4, 5, device=dev), 1)
loss, row_max, row_log_sum, target_logit, total, _ = ops.cross_entropy_forward(x, t, None, None, 1, -100, 0.0, 0.0,
                                                                                0.0, 1.0, False)
g = torch.ones((), device=dev)
row_weight, weight_sum = torch.ones(4, device=dev), torch.tensor(9.0, device=dev)
"""
# Each call is the set-up's good one with one argument made bad.
F_ARGS = "x, t, None, None, 1, -100, 0.0, 0.0, 0.0, 1.0, False"
B_ARGS = "g, x, t, None, None, row_max, row_log_sum, total, None, None, None, 1, -100, 0.0, 0.0, 0.0, 1.0, False"
# A shard of classes [2, 7) of 9.
S_ARGS = ("g, x, t, None, None, row_max, row_log_sum, row_weight, total, weight_sum, None, None, None, 1, -100, "
          "0.0, 0.0, 0.0, 1.0, False, 2, 9")
# The extras' slots, (grad_logprob, grad_entropy, row_entropy), in B_ARGS and S_ARGS.
EXTRAS = "None, None, None, 1"


def _call(op: str, args: str, **replace: str) -> str:
    """``ops.<op>(args)`` with the first occurrence of each key of ``replace`` replaced."""
    for old, new in replace.items():
        args = args.replace(old, new, 1)
    return f"ops.{op}({args})"


def _forward(**replace: str) -> str:
    return _call("cross_entropy_forward", F_ARGS, **replace)


def _backward(**replace: str) -> str:
    return _call("cross_entropy_backward", B_ARGS, **replace)


BAD_DIRECT_CALLS = {
    "target shorter than the rows": (_forward(**{" t,": " t[:2],"}), "target"),
    "target longer than the rows": (_forward(**{" t,": " torch.zeros(9, dtype=torch.long, device=dev),"}), "target"),
    "int32 target": (_forward(**{" t,": " t.int(),"}), "target"),
    "probabilities of another shape": (_forward(**{" t,": " q[:, :3],"}), "target"),
    "probabilities of another dtype": (_forward(**{" t,": " q.double(),"}), "target"),
    "weight shorter than the classes": (_forward(**{"None,": "torch.ones(3, device=dev),"}), "weight"),
    "weight of another dtype": (_forward(**{"None,": "torch.ones(5, dtype=torch.float64, device=dev),"}), "weight"),
    "3-d input": (_forward(**{"x,": "x.view(2, 2, 5),"}), "input"),
    "1-d input": (_forward(**{"x, t,": "x[0], t[:1],"}), "input"),
    "integer input": (_forward(**{"x,": "x.long(),"}), "input"),
    "reduction 7": (_forward(**{" 1,": " 7,"}), "reduction"),
    "label_smoothing 2": (_forward(**{"-100, 0.0,": "-100, 2.0,"}), "label_smoothing"),
    "label_smoothing nan": (_forward(**{"-100, 0.0,": "-100, float('nan'),"}), "label_smoothing"),
    "negative lse_square_scale": (_forward(**{"0.0, 0.0, 1.0": "-1.0, 0.0, 1.0"}), "lse_square_scale"),
    "negative softcap": (_forward(**{"0.0, 1.0": "-30.0, 1.0"}), "softcap"),
    "infinite softcap": (_forward(**{"0.0, 1.0": "float('inf'), 1.0"}), "softcap"),
    "class index out of range": (_forward(**{" t,": " torch.tensor([1, 2, 5, 0], device=dev),"}), "class index"),
    "temperature 0": (_forward(**{"1.0, False": "0.0, False"}), "temperature"),
    "sample_weight shorter than the rows": (_forward(**{"None, 1,": "torch.ones(3, device=dev), 1,"}),
                                            "sample_weight"),
    "integer sample_weight": (_forward(**{"None, 1,": "torch.ones(4, dtype=torch.long, device=dev), 1,"}),
                              "sample_weight"),
    "row_max shorter than the rows": (_backward(row_max="row_max[:2]"), "row_max"),
    "row_log_sum shorter than the rows": (_backward(row_log_sum="row_log_sum[:3]"), "row_log_sum"),
    "total_weight not a scalar": (_backward(total="total.expand(2)"), "total_weight"),
    "grad_loss of rows for a mean": (_backward(**{"g, ": "torch.ones(4, device=dev), "}), "grad_loss"),
    "grad_loss shorter than the rows": (_backward(**{"g, ": "torch.ones(3, device=dev), ", "None, 1,": "None, 0,"}),
                                        "grad_loss"),
    "backward target shorter than the rows": (_backward(**{" t,": " t[:2],"}), "target"),
    "backward softcap nan": (_backward(**{"0.0, 1.0": "float('nan'), 1.0"}), "softcap"),
    "temperature nan": (_backward(**{"1.0, False": "float('nan'), False"}), "temperature"),
    "backward sample_weight shorter than the rows": (
        _backward(**{"None, row_max": "torch.ones(2, device=dev), row_max"}), "sample_weight"),
    "grad_entropy without row_entropy": (_backward(**{EXTRAS: "None, torch.ones(4, device=dev), None, 1"}),
                                         "row_entropy"),
    "grad_logprob shorter than the rows": (_backward(**{EXTRAS: "torch.ones(3, device=dev), None, None, 1"}),
                                           "grad_logprob"),
    "grad_logprob for probabilities": (_backward(**{" t,": " q,", EXTRAS: "torch.ones(4, device=dev), None, None, 1"}),
                                       "grad_logprob"),
    "in-place backward target shorter than the rows": (
        _call("cross_entropy_backward_", B_ARGS, **{"g, x,": "g, x.clone(),", " t,": " t[:2],"}), "target"),
    "shard past the classes": (_call("cross_entropy_shard_backward", S_ARGS, **{" 2, 9": " 5, 9"}),
                               "within the 9 classes"),
    "shard with a negative start": (_call("cross_entropy_shard_backward", S_ARGS, **{" 2, 9": " -1, 9"}),
                                    "class_start"),
    "shard grad_entropy of another shape": (
        _call("cross_entropy_shard_backward", S_ARGS,
              **{EXTRAS: "None, torch.ones(3, device=dev), torch.ones(4, device=dev), 1"}), "grad_entropy"),
    "shard row_weight shorter than the rows": (
        _call("cross_entropy_shard_backward", S_ARGS, **{"row_weight,": "row_weight[:2],"}), "row_weight"),
    "shard weight_sum not a scalar": (
        _call("cross_entropy_shard_backward", S_ARGS, **{"weight_sum,": "weight_sum.expand(2),"}), "weight_sum"),
    "shard class index past every class": (
        f"ops.cross_entropy_shard_backward({S_ARGS.replace(' t,', ' torch.tensor([1, 9, 0, 4], device=dev),')})",
        "class index"),
    "shard weight of the whole classes": (
        f"ops.cross_entropy_shard_backward({S_ARGS.replace('None', 'torch.ones(9, device=dev)', 1)})", "weight"),
    "in-place backward of a transposed input": (
        f"ops.cross_entropy_backward_({B_ARGS.replace('g, x,', 'g, x.t().contiguous().t(),')})", "contiguous"),
}


@pytest.mark.compiled_backends
@pytest.mark.parametrize("case", BAD_DIRECT_CALLS)
def test_bad_direct_call_raises(isolated, backend, device, case):
    code, mentions = BAD_DIRECT_CALLS[case]
    if "cross_entropy_backward_(" in code and not myext.backends.has_capability(OP, "inplace_backward", backend,
                                                                                   torch.device(device)):
        pytest.skip(f"{backend} has no in-place backward")
    if "shard" in case and not myext.backends.has_capability(OP, "shard_backward", backend, torch.device(device)):
        pytest.skip(f"{backend} has no shard backward")
    if case in ("class index out of range", "shard class index past every class") and device == "cuda":
        pytest.skip("on CUDA a device-side assertion, which ends the process's CUDA context (see test_gpu.py)")
    result = isolated(DIRECT_SETUP, code, backend, device)
    assert result["outcome"] == "raised", result
    assert mentions in result["message"], result


# --- z-loss, soft-capping and the extras ------------------------------------------

def _torch_z_loss_and_softcap(x, target, weight=None, lse_square_scale=0.0, softcap=None, **kwargs):
    """The options as Liger-Kernel and Gemma 2 define them, from F.cross_entropy."""
    z = softcap * torch.tanh(x / softcap) if softcap else x
    loss = F.cross_entropy(z, target, weight, **{**kwargs, "reduction": "none"})
    kept = target != kwargs.get("ignore_index", -100)
    loss = loss + torch.where(kept, lse_square_scale * torch.logsumexp(z, dim=1) ** 2, 0.0)
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    w = weight if weight is not None else torch.ones(x.shape[1], dtype=x.dtype)
    return loss.sum() / (w[torch.where(kept, target, 0)] * kept).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_and_softcap_match_their_definitions(backend, device, reduction):
    x, target, weight = make_case((9, 13), "class", weighted=True, device=device, scale=20.0)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-2, softcap=10.0)
    loss = myext.cross_entropy(x, target, **kwargs, backend=backend)
    grad_out = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    x_ref = x.detach().cpu().requires_grad_()
    cpu_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss_ref = _torch_z_loss_and_softcap(x_ref, target.cpu(), **cpu_kwargs)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref, grad_out.cpu())
    torch.testing.assert_close(loss.cpu(), loss_ref)
    torch.testing.assert_close(grad.cpu(), grad_ref)


def test_z_loss_pulls_the_log_sum_exp_to_zero(backend, device):
    """The z-loss's gradient step lowers |lse|, the point of it."""
    x = (torch.randn(16, 50, dtype=torch.float64, device=device) + 5).requires_grad_()
    target = torch.randint(0, 50, (16,), device=device)
    lse_before = torch.logsumexp(x.detach(), 1).abs().mean()
    (grad,) = torch.autograd.grad(myext.cross_entropy(x, target, lse_square_scale=1.0, backend=backend), x)
    assert torch.logsumexp(x.detach() - 0.1 * grad, 1).abs().mean() < lse_before


def test_softcap_bounds_the_logits(backend, device):
    """Capped at 5, logits of 1e4 behave as logits of 5: the loss of the right class is
    at most log(C) + 10."""
    x = torch.randn(4, 8, device=device) * 1e4
    target = torch.tensor([0, 1, 2, 3], device=device)
    loss = myext.cross_entropy(x, target, softcap=5.0, reduction="none", backend=backend)
    assert (loss <= math.log(8) + 10 + 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_softcap_gradient_far_beyond_the_cap(backend, device, dtype):
    """Logits thousands of caps out, on either side and at 0: a finite gradient, the
    definition's (whose tanh saturates there, so its derivative is exact)."""
    x = torch.tensor([[0.0, 1e-3, -2.0, 50.0], [-50.0, 0.3, 1e3, -1e3], [2e4, -2e4, 0.0, 1.0]],
                     dtype=dtype, device=device, requires_grad=True)
    target = torch.tensor([0, 2, 1], device=device)
    (grad,) = torch.autograd.grad(myext.cross_entropy(x, target, softcap=0.5, backend=backend), x)
    x_ref = x.detach().cpu().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(_torch_z_loss_and_softcap(x_ref, target.cpu(), softcap=0.5), x_ref)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad.cpu().double(), grad_ref, **({} if dtype == torch.float64 else
                                                                dict(rtol=1e-5, atol=1e-6)))


def _ulp32(t):
    """The float32 ulp at each value of the float64 tensor t."""
    exponent = torch.frexp(t.abs().clamp_min(2.0 ** -126))[1]
    return torch.ldexp(torch.ones_like(t), exponent - 24)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cpp_softcap_of_float32_is_rounded_once(temperature):
    """The float32 cap within an ulp of softcap tanh(x / softcap) / temperature (computed
    in float32 it was 4.5 ulps off, enough to move the softmax and push the gradient
    past twice PyTorch's error) and the slope as close, far out too: across |x| /
    softcap from 1e-9 to 12, both sides of the kernel's switches. One-class rows give
    lse = z, and a z-loss of lambda 1/2 the gradient z dz/dx (the CE term is 0)."""
    cap = 30.0
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.logspace(-9, math.log10(12.0), 60000, dtype=torch.float64),
                   torch.rand(20000, generator=g, dtype=torch.float64) * 0.02 + math.log(2) / 2 - 0.01,
                   torch.rand(20000, generator=g, dtype=torch.float64) * 0.002 + 1 / 256 - 0.001])
    x = (y * cap).float() * torch.where(torch.rand(y.shape, generator=g) < 0.5, -1.0, 1.0)
    x = x.reshape(-1, 1).requires_grad_()
    target = torch.zeros(x.shape[0], dtype=torch.long)
    out = myext.cross_entropy(x, target, softcap=cap, temperature=temperature, reduction="none", return_lse=True,
                              lse_square_scale=0.5, backend="cpp")
    (grad,) = torch.autograd.grad(out.loss.sum(), x)
    x64 = x.detach().double().reshape(-1)
    z_true = cap * torch.tanh(x64 / cap) / temperature
    z = out.lse.double()
    assert ((z - z_true).abs() <= _ulp32(z_true)).all()
    zs_true = z * (1 / torch.cosh(x64 / cap) ** 2 / temperature)
    assert ((grad.double().reshape(-1) - zs_true).abs() <= 2 * _ulp32(zs_true)).all()


@pytest.mark.parametrize("shape", [(7, 11), (2, 11, 3)], ids=str)
def test_extras(backend, device, shape):
    x, target, _ = make_case(shape, "class", dtype=torch.float32, device=device, scale=4.0, requires_grad=False)
    target.view(-1)[0] = -100
    out = myext.cross_entropy(x, target, softcap=3.0, reduction="none", return_lse=True, return_accuracy=True,
                              backend=backend)
    assert isinstance(out, myext.CrossEntropyOutput)
    z = 3.0 * torch.tanh(x / 3.0)
    lse = torch.logsumexp(z, dim=1)
    kept = target != -100
    torch.testing.assert_close(out.lse[kept], lse[kept])
    assert out.lse[~kept].isnan().all()
    assert out.lse.shape == out.loss.shape == target.shape
    expected = (z.argmax(dim=1) == target)[kept].float().mean()
    torch.testing.assert_close(out.accuracy, expected)
    torch.testing.assert_close(out.loss, myext.cross_entropy(x, target, softcap=3.0, reduction="none",
                                                             backend=backend))


def test_extras_take_no_gradient_and_leave_the_loss_as_it_is(backend, device):
    x, target, _ = make_case((6, 9), "class", dtype=torch.float64, device=device)
    loss, lse, accuracy, logprob, entropy = myext.cross_entropy(x, target, return_lse=True, return_accuracy=True,
                                                                backend=backend)
    assert logprob is None and entropy is None
    assert not lse.requires_grad and not accuracy.requires_grad
    (grad,) = torch.autograd.grad(loss, x)
    (grad_plain,) = torch.autograd.grad(myext.cross_entropy(x, target, backend=backend), x)
    torch.testing.assert_close(grad, grad_plain)


def test_accuracy_of_an_all_ignored_batch_is_nan(backend, device):
    x = torch.randn(3, 4, device=device)
    out = myext.cross_entropy(x, torch.full((3,), -100, device=device), return_accuracy=True, backend=backend)
    assert out.accuracy.isnan() and out.lse is None


def test_accuracy_needs_class_indices():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="return_accuracy needs class-index targets"):
        myext.cross_entropy(x, torch.softmax(x, 1), return_accuracy=True)


@pytest.mark.parametrize("changes,message", [
    (dict(lse_square_scale=-1.0), "lse_square_scale must be a finite float >= 0"),
    (dict(lse_square_scale=math.inf), "lse_square_scale must be a finite float >= 0"),
    (dict(softcap=0.0), "softcap must be a finite float > 0, or None"),
    (dict(softcap=-3.0), "softcap must be a finite float > 0, or None"),
    (dict(softcap="30"), "softcap must be a finite float > 0, or None"),
], ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_bad_options(changes, message):
    with pytest.raises(ValueError, match=message):
        myext.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), **changes)



# --- vocabulary parallelism: what is refused before any collective -----------------

@pytest.mark.parametrize("kwargs,error,message", [
    (dict(vocab_parallel=(0, 5, 10)), TypeError, "VocabParallel"),
    (dict(vocab_parallel=VocabParallel(0, 4, 10)), ValueError, "input's class dimension has 5"),
    (dict(vocab_parallel=VocabParallel(0, 5, 10), inplace_backward=True), ValueError, "inplace_backward"),
    (dict(vocab_parallel=VocabParallel(0, 5, 10), weight=torch.ones(7)), ValueError, "weight"),
])
def test_vocab_parallel_bad_arguments(kwargs, error, message):
    logits = torch.randn(3, 5)
    with pytest.raises(error, match=message):
        myext.cross_entropy(logits.clone(), torch.tensor([0, 9, 3]), **kwargs)


def test_vocab_parallel_refuses_forward_ad_and_torch_func():
    logits, target, shard = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 9, 3]), VocabParallel(0, 5, 10)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
            myext.cross_entropy(dual, target, vocab_parallel=shard)
    with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
        torch.func.grad(lambda x: myext.cross_entropy(x, target, vocab_parallel=shard))(logits)


def test_vocab_parallel_class_index_past_every_class():
    with pytest.raises(IndexError, match="class index 10"):
        myext.cross_entropy(torch.randn(3, 5), torch.tensor([0, 10, 3]), vocab_parallel=VocabParallel(5, 10, 10))


@pytest.mark.parametrize("start,stop,classes", [(3, 2, 5), (0, 6, 5), (-1, 2, 5)])
def test_vocab_parallel_needs_a_shard_within_the_classes(start, stop, classes):
    with pytest.raises(ValueError, match="start <= stop <= classes"):
        VocabParallel(start, stop, classes)


@pytest.mark.parametrize("size,parts", [(11, 3), (2, 3), (32000, 2), (7, 1)])
def test_split_range_covers_the_classes_once(size, parts):
    ranges = [split_range(size, parts, index) for index in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(stop - start for start, stop in ranges) - min(stop - start for start, stop in ranges) <= 1
