"""myext.linear_relu on every backend, against the plain-PyTorch reference and F.linear + F.relu."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import myext

# Tests taking backend and device run on every backend of the op (conftest.py).
OP = "linear_relu"
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


# Tolerances against F.relu(F.linear(...)) in the same dtype. float32: both sides
# are BLAS GEMMs that may sum in different orders. bfloat16: 8 bits of mantissa,
# so a relative error of a few 2**-8, as the anchors allow for fused dense layers.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.compiled_backends
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


@pytest.mark.compiled_backends
def test_reference_is_the_spec(backend, device):
    x, w, b = make_args((6, 9), out_features=7, dtype=torch.float64, device=device)
    torch.testing.assert_close(myext.linear_relu(x, w, b, backend=backend), myext.reference.linear_relu(x, w, b))
    torch.testing.assert_close(myext.reference.linear_relu(x, w, b), expected(x, w, b))


def _onednn_calls(fn):
    """fn's result, and how many GEMMs it ran on oneDNN."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(event.name == "mkldnn::_linear_pointwise" for event in prof.events())


def _fwd_bwd(x, w, b, grad=None):
    out = myext.linear_relu(x, w, b, backend="cpp")
    params = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, params, torch.ones_like(out) if grad is None else grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_relu_of_special_values(dtype):
    """The ReLU pass as torch.relu on NaN of either sign, infinities, signed zeros and
    the smallest numbers (bfloat16 and half are masked as 16-bit integers): here the
    GEMM is 0 and each output is its bias."""
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, tiny, -tiny, 3.0, -3.0], dtype=dtype)
    negative_nan = -torch.tensor([math.nan], dtype=dtype)
    bias = torch.cat([specials, negative_nan, torch.randn(27, dtype=dtype)])  # 37: a vector's tail too
    x = torch.zeros(70, 8, dtype=dtype)
    w = torch.zeros(bias.numel(), 8, dtype=dtype)
    out = myext.linear_relu(x, w, bias, backend="cpp")
    torch.testing.assert_close(out, torch.relu(bias).expand(70, -1), rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("layout", ["contiguous", "transposed-input", "3d-input", "no-bias", "strided-bias"])
def test_cpp_onednn_path(layout, cpu_gemm_policy):
    cpu_gemm_policy("onednn")
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

    (out, grads), calls = _onednn_calls(lambda: _fwd_bwd(x, w, b, grad))
    assert calls == 3, "the forward, input-gradient and weight-gradient GEMMs should run on oneDNN"
    assert out.flatten(0, -2)[0].isnan().all()
    refs = [t.detach().clone().requires_grad_() for t in params]
    out_ref = F.linear(*refs)
    torch.testing.assert_close(out, F.relu(out_ref), rtol=1e-5, atol=2e-4, equal_nan=True)
    grads_ref = torch.autograd.grad(out_ref, refs, grad * (out.detach() > 0))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=2e-4, equal_nan=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("how", ["torch switch", "policy aten"])
def test_cpp_onednn_path_can_be_switched_off(how, cpu_gemm_policy):
    cpu_gemm_policy("onednn" if how == "torch switch" else "aten")
    x, w, b = make_args((256, 784), out_features=128, dtype=torch.float32)
    with torch.backends.mkldnn.flags(enabled=how != "torch switch"):
        (out, grads), calls = _onednn_calls(lambda: _fwd_bwd(x, w, b))
    assert calls == 0
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)), rtol=1e-5, atol=2e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_cpp_gemm_probe_measures_each_shape_class_once_and_keeps_the_faster(cpu_gemm_policy):
    from myext import machine

    cpu_gemm_policy("probe")
    x, w, b = make_args((200, 784), out_features=128, dtype=torch.float32)
    out, grads = _fwd_bwd(x, w, b)
    choices = machine.cpu_gemm_choices()
    # forward x @ w^T, input gradient G @ w, weight gradient G^T @ x: rows rounded up
    # to a power of two, the layouts of the operands as the kernel passes them
    assert sorted((c.rows_up_to, c.inner, c.cols, c.a_layout, c.b_layout) for c in choices) == [
        (128, 200, 784, "c", "r"), (256, 128, 784, "r", "r"), (256, 784, 128, "r", "c")]
    for c in choices:
        assert 0 < c.aten_seconds and 0 < c.onednn_seconds
        assert c.onednn == (c.onednn_seconds < 0.95 * c.aten_seconds)
    # The same classes again: no new measurement, and oneDNN runs exactly the GEMMs
    # whose class chose it; a forward of fewer rows (still up to 256) is in its class.
    _, calls = _onednn_calls(lambda: _fwd_bwd(x, w, b))
    assert calls == sum(c.onednn for c in choices)
    with torch.no_grad():
        myext.linear_relu(x[:150], w, b, backend="cpp")
    assert machine.cpu_gemm_choices() == choices
    for g, g_ref in zip(grads, torch.autograd.grad(F.relu(F.linear(x, w, b)), (x, w, b), torch.ones(200, 128))):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=2e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("rows, in_features, out_features", [(1100, 1024, 1024), (1024, 1024, 1100),
                                                              (2048, 2048, 2048)])
def test_cpp_gemm_probe_of_large_gemms_times_a_slice(rows, in_features, out_features, cpu_gemm_policy):
    """A GEMM beyond the probe's 2**30 multiply-adds is timed on a slice: each dimension
    above a cap cut to it, the largest cap that keeps the slice within 2**30 (so the
    rows, the columns or the inner dimension of the weight gradient alone where one is
    largest, and all three of a cube). The classes are still measured once each, and
    every result is of the whole GEMM."""
    from myext import machine

    def timed(shape):
        cap = max(c for c in range(1, max(shape) + 1) if math.prod(min(d, c) for d in shape) <= 2**30)
        return tuple(min(d, cap) for d in shape)

    cpu_gemm_policy("probe")
    x, w, b = make_args((rows, in_features), out_features=out_features, dtype=torch.float32)
    out, grads = _fwd_bwd(x, w, b)
    choices = machine.cpu_gemm_choices()
    assert len(choices) == 3 and all(0 < c.aten_seconds and 0 < c.onednn_seconds for c in choices)
    for c in choices:  # rows_up_to rounds 1100 up to 2048; every other dimension is exact
        shape = (min(c.rows_up_to, max(rows, in_features, out_features)), c.inner, c.cols)
        assert c.timed_shape == timed(shape) != shape
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)), rtol=1e-5, atol=2e-4)
    # The gradients through the ReLU mask of this output: at 2048 features a few
    # pre-activations near 0 round to either sign depending on the GEMM library.
    upstream = (out > 0).double()
    want = (upstream @ w.double(), upstream.t() @ x.double(), upstream.sum(0))
    for g, g_ref in zip(grads, want):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-3)
    _fwd_bwd(x, w, b)
    assert machine.cpu_gemm_choices() == choices


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_cpp_gemm_probe_across_threads(cpu_gemm_policy):
    """Threads whose first GEMMs fall in one shape class at once: one measures, the others
    wait for its answer; every result is right, and the class is measured once."""
    from myext import machine

    cpu_gemm_policy("probe")
    x, w, b = make_args((300, 784), out_features=128, dtype=torch.float32, requires_grad=False)
    expected = F.relu(F.linear(x, w, b))
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(6)

    def run(i):
        start.wait()
        results[i] = myext.linear_relu(x[i * 8:], w, b, backend="cpp")  # 260 to 300 rows: one class

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        torch.testing.assert_close(results[i], expected[i * 8:], rtol=1e-5, atol=2e-4)
    assert [(c.rows_up_to, c.inner, c.cols) for c in machine.cpu_gemm_choices()] == [(512, 784, 128)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_gemm_probe_measures_reduced_dtypes_in_classes_of_their_own(dtype, cpu_gemm_policy):
    """bfloat16 and half GEMMs are probed like float32 ones, in classes of their own; where
    this CPU's oneDNN has no kernel for the dtype (it raises), they stay on ATen. A pinned
    oneDNN takes float32 only."""
    from myext import machine

    cpu_gemm_policy("probe")
    x, w, b = make_args((64, 96), out_features=32, dtype=dtype)
    out, grads = _fwd_bwd(x, w, b)
    choices = machine.cpu_gemm_choices()
    assert [c.dtype for c in choices] == [str(dtype).removeprefix("torch.")] * 3
    for c in choices:
        assert 0 < c.aten_seconds and 0 < c.onednn_seconds  # inf: oneDNN has no kernel here
        assert c.onednn == (c.onednn_seconds < 0.95 * c.aten_seconds)
    torch.testing.assert_close(out, expected(x, w, b), rtol=2e-2, atol=2e-2)
    _fwd_bwd(*(t.detach().float().requires_grad_() for t in (x, w, b)))
    assert sorted(c.dtype for c in machine.cpu_gemm_choices()) == sorted(["float32"] * 3 + [choices[0].dtype] * 3)

    cpu_gemm_policy("onednn")
    (out_pinned, _), calls = _onednn_calls(lambda: _fwd_bwd(x, w, b))
    assert calls == 0
    torch.testing.assert_close(out_pinned, out, rtol=2e-2, atol=2e-2)


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


def _linear_relu_ops_that_ran(*args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        myext.linear_relu(*args).sum().backward()
    return {event.name for event in prof.events() if event.name.startswith("myext::")}


def test_env_var_sets_default_backend(monkeypatch):
    x, w, b = make_args((4, 5), dtype=torch.float32)
    monkeypatch.setenv("MYEXT_BACKEND", "torch")
    assert _linear_relu_ops_that_ran(x, w, b) == set()
    monkeypatch.setenv("MYEXT_BACKEND", "cpp")
    assert _linear_relu_ops_that_ran(x, w, b) == {"myext::linear_relu", "myext::linear_relu_backward"}
    monkeypatch.setenv("MYEXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$MYEXT_BACKEND must be one of"):
        myext.linear_relu(x, w, b)


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


def test_reference_relu_gradient_at_zero():
    """A pre-activation of exactly 0 passes no gradient, as with F.relu (common in bfloat16)."""
    x = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    w = torch.eye(2, dtype=torch.float64)
    myext.reference.linear_relu(x, w).sum().backward()
    assert x.grad.eq(0).all()


# Direct calls of the dispatcher ops with arguments the Python layer refuses (the ops
# are public): each must raise, naming the argument, never crash, read out of bounds
# or return an answer. Each runs in a worker process of its own (conftest.isolated).
DIRECT_SETUP = """
x = torch.randn(4, 5, device=dev)
w = torch.randn(3, 5, device=dev)
b = torch.randn(3, device=dev)
y = ops.linear_relu(x, w, b)
g = torch.randn(4, 3, device=dev)
mask = [True, True, True]
"""
BAD_DIRECT_CALLS = {
    "bias shorter than out_features": ("ops.linear_relu(x, w, b[:2])", "bias"),
    "2-d bias": ("ops.linear_relu(x, w, b.view(1, 3))", "bias"),
    "bias of another dtype": ("ops.linear_relu(x, w, b.double())", "bias"),
    "in_features that differ": ("ops.linear_relu(x, w[:, :4], b)", "in_features"),
    "1-d weight": ("ops.linear_relu(x, w[0], None)", "weight"),
    "weight of another dtype": ("ops.linear_relu(x, w.double(), b)", "weight"),
    "0-d input": ("ops.linear_relu(x[0, 0], w, b)", "input"),
    "integer input": ("ops.linear_relu(x.long(), w.long(), None)", "input"),
    "grad_output of another shape": ("ops.linear_relu_backward(g[:2], x, w, y, mask)", "grad_output"),
    "grad_output of another dtype": ("ops.linear_relu_backward(g.double(), x, w, y, mask)", "grad_output"),
    "output of another shape": ("ops.linear_relu_backward(g, x, w, y[:, :2], mask)", "output"),
    "backward weight for other in_features": ("ops.linear_relu_backward(g, x, w[:, :4], y, mask)", "in_features"),
}


@pytest.mark.compiled_backends
@pytest.mark.parametrize("case", BAD_DIRECT_CALLS)
def test_bad_direct_call_raises(isolated, backend, device, case):
    code, mentions = BAD_DIRECT_CALLS[case]
    result = isolated(DIRECT_SETUP, code, backend, device)
    assert result["outcome"] == "raised", result
    assert mentions in result["message"], result

