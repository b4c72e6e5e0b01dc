"""myext.linear_relu on every backend, against the plain-PyTorch reference and F.linear + F.relu."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import myext
from conftest import backend_device_params

BACKENDS = backend_device_params()
KERNEL_BACKENDS = backend_device_params(include_reference=False)
# Input shapes (*, in_features) with in_features = 5: 1-d, 2-d and 3-d inputs.
SHAPES = [(5,), (4, 5), (2, 3, 5)]


def make_args(shape, out_features=3, bias=True, dtype=torch.float64, device="cpu", requires_grad=True):
    in_features = shape[-1]
    x = torch.randn(*shape, dtype=dtype, device=device)
    w = torch.randn(out_features, in_features, dtype=dtype, device=device)
    b = torch.randn(out_features, dtype=dtype, device=device) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def expected(x, w, b):
    return F.relu(F.linear(x, w, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(backend, device, shape, bias):
    x, w, b = make_args(shape, bias=bias, device=device)
    fn = lambda *args: myext.linear_relu(*args, backend=backend)  # noqa: E731
    inputs = (x, w, b) if bias else (x, w)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_noncontiguous(backend, device):
    x = torch.randn(5, 4, dtype=torch.float64, device=device).t().requires_grad_()
    w = torch.randn(5, 3, dtype=torch.float64, device=device).t().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, device=device)[::2].requires_grad_()
    fn = lambda *args: myext.linear_relu(*args, backend=backend)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


# Tolerances against F.relu(F.linear(...)) in the same dtype. float32: both sides
# are BLAS GEMMs that may sum in different orders. bfloat16: 8 bits of mantissa,
# so a relative error of a few 2**-8, as the anchors allow for fused dense layers.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5,), (33, 70), (3, 17, 70)], ids=str)
def test_matches_functional(backend, device, dtype, shape):
    x, w, b = make_args(shape, out_features=40, dtype=dtype, device=device)
    out = myext.linear_relu(x, w, b, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), grad)

    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out_ref = expected(x_ref, w_ref, b_ref)
    # Gradients are compared under our output's ReLU mask: a pre-activation within
    # rounding of zero may land on either side in two GEMMs that sum in different
    # orders, and a flipped mask moves a whole gradient entry.
    grads_ref = torch.autograd.grad(F.linear(x_ref, w_ref, b_ref), (x_ref, w_ref, b_ref), grad * (out.detach() > 0))

    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, **TOLERANCES[dtype])
    for g, g_ref in zip(grads, grads_ref):
        # Gradients sum over rows: allow the tolerance to grow with the summed length.
        scale = max(shape[0] if len(shape) > 1 else 1, 1) ** 0.5
        tol = {k: v * scale for k, v in TOLERANCES[dtype].items()}
        torch.testing.assert_close(g, g_ref, **tol)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_reference_is_the_spec(backend, device):
    x, w, b = make_args((6, 9), out_features=7, dtype=torch.float64, device=device)
    torch.testing.assert_close(myext.linear_relu(x, w, b, backend=backend), myext.reference.linear_relu(x, w, b))
    torch.testing.assert_close(myext.reference.linear_relu(x, w, b), expected(x, w, b))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    op = myext.backends.kernels(backend).linear_relu
    backward_op = myext.backends.kernels(backend).linear_relu_backward
    # The ops are differentiated by FusedLinearReLUFunction, not on their own: no sample requires grad.
    samples = [
        make_args((4, 5), device=device, requires_grad=False),
        make_args((2, 3, 5), bias=False, device=device, requires_grad=False),
        (torch.randn(5, 4, dtype=torch.float64, device=device).t(),
         torch.randn(5, 3, dtype=torch.float64, device=device).t(), None),
    ]
    for x, w, b in samples:
        torch.library.opcheck(op, (x, w, b))
        output = op(x, w, b)
        for grad in (torch.randn_like(output), torch.randn_like(output).transpose(0, -1).contiguous().transpose(0, -1)):
            for mask in ([True, True, True], [False, True, False]):
                torch.library.opcheck(backward_op, (grad, x, w, output, mask))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def fn(x, w, b):
        return myext.linear_relu(x, w, b, backend=backend)

    x, w, b = make_args((8, 5), out_features=6, dtype=torch.float32, device=device)
    out = fn(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    out_c = torch.compile(fn, fullgraph=True)(x, w, b)
    grads_c = torch.autograd.grad(out_c, (x, w, b), torch.ones_like(out_c))
    torch.testing.assert_close(out_c, out)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_does_not_change_inputs(backend, device):
    x, w, b = make_args((6, 5), dtype=torch.float32, device=device)
    before = [t.detach().clone() for t in (x, w, b)]
    out = myext.linear_relu(x, w, b, backend=backend)
    out.backward(torch.randn_like(out))
    for t, t_before in zip((x, w, b), before):
        assert torch.equal(t.detach(), t_before)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_backend_runs_its_own_kernel(backend, device):
    """The op of the named backend is what runs (no silent fallback to another backend)."""
    x, w, b = make_args((4, 5), dtype=torch.float32, device=device)
    op_name = myext.backends.kernels(backend).linear_relu._qualified_op_name
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        myext.linear_relu(x, w, b, backend=backend).sum().backward()
    names = {event.name for event in prof.events()}
    assert op_name in names
    assert op_name.replace("::linear_relu", "::linear_relu_backward") in names


def _onednn_calls(fn):
    """fn's result, and how many GEMMs it ran on oneDNN."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(event.name == "mkldnn::_linear_pointwise" for event in prof.events())


# The cpp backend hands float32 GEMMs of at least 8 MFLOP to oneDNN; these shapes are
# above that (SimpleNet's fc1 at batch 256 is 51 MFLOP), the other tests' below.
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("layout", ["contiguous", "transposed-input", "3d-input", "no-bias", "strided-bias"])
def test_cpp_onednn_path(layout):
    x, w, b = make_args((256, 784), out_features=128, dtype=torch.float32, requires_grad=False)
    x[0, 0] = float("nan")  # the ReLU keeps NaN, as torch.relu does (oneDNN's ReLU post-op would not)
    if layout == "transposed-input":
        x = x.t().contiguous().t()
    elif layout == "3d-input":
        x = x.view(4, 64, 784)
    elif layout == "no-bias":
        b = None
    elif layout == "strided-bias":
        b = torch.randn(256)[::2]
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad = torch.randn(*x.shape[:-1], 128)

    def fwd_bwd():
        out = myext.linear_relu(x, w, b, backend="cpp")
        return out, torch.autograd.grad(out, params, grad)

    (out, grads), calls = _onednn_calls(fwd_bwd)
    assert calls == 2, "the forward and input-gradient GEMMs should run on oneDNN"
    assert out.flatten(0, -2)[0].isnan().all()
    refs = [t.detach().clone().requires_grad_() for t in params]
    out_ref = F.linear(*refs)
    torch.testing.assert_close(out, F.relu(out_ref), rtol=1e-5, atol=2e-4, equal_nan=True)
    grads_ref = torch.autograd.grad(out_ref, refs, grad * (out.detach() > 0))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=2e-4, equal_nan=True)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_cpp_onednn_path_follows_torch_switch():
    x, w, b = make_args((256, 784), out_features=128, dtype=torch.float32)
    with torch.backends.mkldnn.flags(enabled=False):
        _, calls = _onednn_calls(lambda: myext.linear_relu(x, w, b, backend="cpp").sum().backward())
    assert calls == 0


BAD_INPUTS = [
    ("input", lambda x, w, b: (x.to(torch.int64), w, b), TypeError, "input must have a floating dtype"),
    ("input", lambda x, w, b: (x[:, :4], w, b), ValueError, "input's last dimension"),
    ("weight", lambda x, w, b: (x, w[0], b), ValueError, "weight must be 2-d"),
    ("weight", lambda x, w, b: (x, w.double(), b), TypeError, "weight has dtype"),
    ("bias", lambda x, w, b: (x, w, b[:2]), ValueError, "bias must have shape"),
    ("bias", lambda x, w, b: (x, w, b.unsqueeze(0)), ValueError, "bias must have shape"),
    ("bias", lambda x, w, b: (x, w, b.double()), TypeError, "bias has dtype"),
    ("input", lambda x, w, b: (x.sum(), w, b), ValueError, "at least one dimension"),
    ("input", lambda x, w, b: (x.tolist(), w, b), TypeError, "input must be a torch.Tensor"),
    ("device", lambda x, w, b: (x.to("meta"), w, b), ValueError, "expected all tensors on one device"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input(backend, device, name, mutate, error, message):
    x, w, b = make_args((4, 5), dtype=torch.float32, device=device, requires_grad=False)
    with pytest.raises(error, match=message):
        myext.linear_relu(*mutate(x, w, b), backend=backend)


def test_bad_backend():
    x, w, b = make_args((4, 5), dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        myext.linear_relu(x, w, b, backend="fortran")
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        myext.linear_relu(x, w, b, backend="cuda")


def test_env_var_sets_default_backend(monkeypatch):
    x, w, b = make_args((4, 5), dtype=torch.float32, requires_grad=False)
    monkeypatch.setenv("MYEXT_BACKEND", "torch")
    assert myext.linear_relu(x, w, b).grad_fn is None
    monkeypatch.setenv("MYEXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$MYEXT_BACKEND must be one of"):
        myext.linear_relu(x, w, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,out_features", [((0, 5), 3), ((4, 0), 3), ((4, 5), 0)], ids=str)
def test_empty_dimensions(backend, device, shape, out_features):
    x, w, b = make_args(shape, out_features=out_features, dtype=torch.float32, device=device)
    out = myext.linear_relu(x, w, b, backend=backend)
    out_ref = expected(x, w, b)
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad(out.sum(), (x, w, b), allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref.sum(), (x, w, b), allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(g_ref), g_ref)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_inference_skips_autograd(backend, device):
    x, w, b = make_args((6, 5), dtype=torch.float32, device=device)
    with torch.no_grad():
        out = myext.linear_relu(x, w, b, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, myext.linear_relu(x, w, b, backend=backend).detach())
