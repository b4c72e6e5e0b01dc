"""GPU-only checks of the cuda and triton backends at realistic sizes (skipped without a GPU).

Tolerances. A fixed rtol/atol at these sizes would either hide real errors or fail on
rounding, so each result is held to the rule cut-cross-entropy uses: its error against
a float64 ground truth, computed from the same input values, may be at most twice
PyTorch's own error in the same dtype, plus a floor of 4 units of the dtype's rounding
(eps times the largest true value) for results PyTorch happens to get exact, and for
sums the rounding that their order alone explains (assert_as_precise_as_torch). Low-precision
kernels that accumulate in float32 and round once come out well inside this; one that
accumulated in bfloat16 would not.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import myext

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE_INDEX = -100


def require(backend):
    if backend not in myext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")


def max_error(value, truth):
    return (value.detach().double() - truth).abs().max().item()


def assert_as_precise_as_torch(ours, by_torch, truth, dtype, what, terms=1):
    """terms: how many products a result sums. Two float32 accumulations of the same
    products in different orders differ by about sqrt(terms) float32 roundings of the
    result on random data (measured here: 2-5x under this allowance for 300 and 4096
    terms), so a kernel may lose that much to PyTorch's order. Accumulating in tf32 or
    bfloat16 costs 2**13 or 2**16 times more and still fails."""
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    largest = truth.abs().max().item()
    floor = (4 * torch.finfo(dtype).eps + torch.finfo(accumulator).eps * terms ** 0.5) * largest
    ours_error, torch_error = max_error(ours, truth), max_error(by_torch, truth)
    assert ours_error <= 2 * torch_error + floor, (
        f"{what}: max error {ours_error:.3g} against float64, PyTorch's {torch_error:.3g} (floor {floor:.3g})")


def misaligned(shape, dtype):
    """A contiguous tensor of standard normals whose data starts one element past an
    allocation boundary, hence not 16-byte aligned."""
    storage = torch.empty(math.prod(shape) + 1, dtype=dtype, device="cuda")
    return storage[1:].view(shape).normal_()


def cuda_kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


def ran(names, kernel):
    return any("myext::cuda" in name and kernel in name for name in names)


def test_cuda_backend_is_built():
    assert "cuda" in myext.available_backends("cuda"), "myext was built without its CUDA kernels"


# --- linear_relu ---------------------------------------------------------------

# (input shape, out_features): SimpleNet's fc1 and a transformer-sized MLP layer.
LINEAR_SHAPES = {"simplenet-fc1": ((256, 784), 128), "mlp": ((4, 512, 1024), 4096)}


def linear_args(x, out_features, dtype):
    in_features = x.shape[-1]
    w = (torch.randn(out_features, in_features, device="cuda") / in_features ** 0.5).to(dtype)
    b = torch.randn(out_features, device="cuda").to(dtype)
    return [t.requires_grad_() for t in (x, w, b)]


def check_linear_relu(backend, x, w, b, dtype):
    """Output and gradients of myext.linear_relu against float64, as precise as PyTorch's."""
    out = myext.linear_relu(x, w, b, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), grad)

    x64, w64, b64, g64 = (t.detach().double() for t in (x, w, b, grad))
    assert_as_precise_as_torch(out, F.relu(F.linear(x, w, b)), F.relu(F.linear(x64, w64, b64)), dtype, "output",
                               terms=x.shape[-1])

    # The gradients are compared under our own output's ReLU mask: where a pre-activation
    # rounds to the other side of zero the masks differ by a whole gradient entry, which
    # says nothing about the backward pass.
    mask = out.detach() > 0
    masked, masked64 = (grad * mask).flatten(0, -2), (g64 * mask).flatten(0, -2)
    x2, x64_2 = x.detach().flatten(0, -2), x64.flatten(0, -2)
    by_torch = ((masked @ w.detach()).view(x.shape), masked.t() @ x2, masked.sum(0))
    truth = ((masked64 @ w64).view(x.shape), masked64.t() @ x64_2, masked64.sum(0))
    terms = (w.shape[0], x2.shape[0], x2.shape[0])
    for name, ours, theirs, true, length in zip(("grad_input", "grad_weight", "grad_bias"), grads, by_torch, truth,
                                                terms):
        assert_as_precise_as_torch(ours, theirs, true, dtype, name, terms=length)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_relu_as_precise_as_torch(backend, dtype, shape):
    require(backend)
    x_shape, out_features = LINEAR_SHAPES[shape]
    x = torch.randn(x_shape, device="cuda").to(dtype)
    check_linear_relu(backend, *linear_args(x, out_features, dtype), dtype)


# Shapes and layouts cuBLASLt's epilogue refuses, and the backward kernel's scalar
# (unpacked) path: an input not 16-byte aligned, in_features and out_features odd.
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["misaligned-input", "odd-features"])
def test_linear_relu_unaligned(backend, dtype, layout):
    require(backend)
    if layout == "misaligned-input":
        x, out_features = misaligned((300, 512), dtype), 256
    else:
        x, out_features = torch.randn(300, 333, device="cuda").to(dtype), 257
    check_linear_relu(backend, *linear_args(x, out_features, dtype), dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_linear_relu_float64(backend):
    require(backend)
    x, w, b = linear_args(torch.randn(300, 200, device="cuda", dtype=torch.float64), 100, torch.float64)
    out = myext.linear_relu(x, w, b, backend=backend)
    grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out_ref = F.relu(F.linear(x_ref, w_ref, b_ref))
    grads_ref = torch.autograd.grad(out_ref, (x_ref, w_ref, b_ref), torch.ones_like(out_ref))
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


# --- cross_entropy -------------------------------------------------------------

CE_CASES = {
    "class": dict(kind="class", weighted=False, smoothing=0.0),
    "class-weighted-smoothed": dict(kind="class", weighted=True, smoothing=0.1),
    "prob-weighted-smoothed": dict(kind="prob", weighted=True, smoothing=0.1),
}
# 32000: one block per row. 128256 (Llama 3's vocabulary): several blocks per row.
VOCABULARIES = [32000, 128256]


def make_ce(x, kind, weighted):
    rows, classes = x.shape
    if kind == "class":
        target = torch.randint(0, classes, (rows,), device="cuda")
        target[::7] = IGNORE_INDEX
    else:
        target = torch.softmax(torch.randn(rows, classes, device="cuda"), dim=1).to(x.dtype)
    weight = (torch.rand(classes, device="cuda") + 0.5).to(x.dtype) if weighted else None
    return target, weight


def check_cross_entropy(backend, x, target, weight, smoothing, reduction):
    """Loss and gradient of myext.cross_entropy against float64, as precise as PyTorch's."""
    dtype = x.dtype
    kwargs = dict(ignore_index=IGNORE_INDEX, reduction=reduction, label_smoothing=smoothing)
    x = x.detach().requires_grad_()
    loss = myext.cross_entropy(x, target, weight, **kwargs, backend=backend)
    grad_loss = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)

    x_torch = x.detach().requires_grad_()
    loss_torch = F.cross_entropy(x_torch, target, weight, **kwargs)
    (grad_torch,) = torch.autograd.grad(loss_torch, x_torch, grad_loss)

    x64 = x.detach().double().requires_grad_()
    target64 = target.double() if target.is_floating_point() else target
    loss64 = F.cross_entropy(x64, target64, weight.double() if weight is not None else None, **kwargs)
    (grad64,) = torch.autograd.grad(loss64, x64, grad_loss.double())

    assert loss.dtype == dtype and grad.dtype == dtype
    assert_as_precise_as_torch(loss, loss_torch, loss64.detach(), dtype, "loss")
    assert_as_precise_as_torch(grad, grad_torch, grad64, dtype, "grad_input")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", VOCABULARIES)
@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_as_precise_as_torch(backend, dtype, classes, case, reduction):
    require(backend)
    options = CE_CASES[case]
    x = (torch.randn(256, classes, device="cuda") * 3).to(dtype)
    target, weight = make_ce(x, options["kind"], options["weighted"])
    check_cross_entropy(backend, x, target, weight, options["smoothing"], reduction)


# Rows that do not start 16-byte aligned take the kernels' scalar-load path: logits
# that start one element off, and a class count that no 16 bytes divide.
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["misaligned-input", "odd-classes"])
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_cross_entropy_unaligned(backend, dtype, layout, kind):
    require(backend)
    if layout == "misaligned-input":
        x = misaligned((256, 32000), dtype).mul_(3)
    else:
        x = (torch.randn(256, 32001, device="cuda") * 3).to(dtype)
    target, weight = make_ce(x, kind, weighted=True)
    check_cross_entropy(backend, x, target, weight, 0.1, "mean")


def test_cross_entropy_out_of_range_class_is_an_error():
    """Called directly (as a compiled graph does, with no Python check), the CUDA op stops
    at an out-of-range class index instead of reading out of bounds. A device-side
    assertion ends the CUDA context, hence a fresh process."""
    code = (
        "import torch, myext\n"
        "x = torch.randn(4, 10, device='cuda')\n"
        "target = torch.tensor([1, 2, 10, 3], device='cuda')\n"
        "torch.ops.myext.cross_entropy_forward(x, target, None, None, 1, -100, 0.0, 0.0, 0.0, 1.0, False)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "class index out of range" in output or "device-side assert" in output, output


# --- linear_cross_entropy --------------------------------------------------------

def check_linear_cross_entropy(backend, x, w, target, reduction, chunk_size=None, **options):
    """Loss and gradients of the fused op against float64, as precise as PyTorch's
    F.cross_entropy(F.linear(...)) in the same dtype."""
    dtype = x.dtype
    leaves = [t.detach().requires_grad_() for t in (x, w)]
    loss = myext.linear_cross_entropy(*leaves, target, reduction=reduction, chunk_size=chunk_size, **options,
                                      backend=backend)
    grad_loss = torch.rand_like(loss)
    grads = torch.autograd.grad(loss, leaves, grad_loss)

    def pytorch(x, w):
        return F.cross_entropy(F.linear(x, w), target, reduction=reduction, **options)

    torch_leaves = [t.detach().requires_grad_() for t in (x, w)]
    loss_torch = pytorch(*torch_leaves)
    grads_torch = torch.autograd.grad(loss_torch, torch_leaves, grad_loss)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    loss64 = pytorch(*leaves64)
    grads64 = torch.autograd.grad(loss64, leaves64, grad_loss.double())
    assert_as_precise_as_torch(loss, loss_torch, loss64.detach(), dtype, "loss", terms=x.shape[0])
    for name, ours, theirs, truth, terms in zip(("grad_input", "grad_linear_weight"), grads, grads_torch, grads64,
                                                (w.shape[0], x.shape[0])):
        assert ours.dtype == dtype
        assert_as_precise_as_torch(ours, theirs, truth, dtype, name, terms=terms)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", VOCABULARIES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_as_precise_as_torch(backend, dtype, classes, reduction):
    require(backend)
    x = torch.randn(1024, 512, device="cuda").to(dtype)
    w = (torch.randn(classes, 512, device="cuda") * 3 / 512 ** 0.5).to(dtype)
    target = torch.randint(0, classes, (1024,), device="cuda")
    target[::7] = IGNORE_INDEX
    check_linear_cross_entropy(backend, x, w, target, reduction, label_smoothing=0.1, chunk_size=384)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_linear_cross_entropy_accum_dtype(backend):
    """accum_dtype=torch.bfloat16 sums the weight gradient over 8 chunks in the gradient
    itself: the loss and the input's gradient the default's bits, the weight's within a
    rounding of bfloat16 per chunk and two more at the scale of its terms' magnitudes."""
    require(backend)
    x = torch.randn(1024, 512, device="cuda").bfloat16()
    w = (torch.randn(4096, 512, device="cuda") * 3 / 512 ** 0.5).bfloat16()
    target = torch.randint(0, 4096, (1024,), device="cuda")

    def run(**accum):
        leaves = [t.detach().requires_grad_() for t in (x, w)]
        loss = myext.linear_cross_entropy(*leaves, target, chunk_size=128, backend=backend, **accum)
        return loss, torch.autograd.grad(loss, leaves)

    (loss, (grad_x, grad_w)), (loss0, (grad_x0, grad_w0)) = run(accum_dtype=torch.bfloat16), run()
    assert grad_w.dtype == torch.bfloat16
    assert torch.equal(loss, loss0) and torch.equal(grad_x, grad_x0)
    d = torch.softmax(x.double() @ w.double().t(), dim=1)
    d[torch.arange(1024, device="cuda"), target] -= 1
    magnitude = (d.abs() / 1024).t() @ x.double().abs()
    error = (grad_w.double() - grad_w0.double()).abs()
    assert (error <= 10 * torch.finfo(torch.bfloat16).eps * magnitude).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_linear_cross_entropy_memory(backend):
    """Training memory beyond the inputs and their gradients: at most 1/8 of the logits
    (bf16, 4096 x 1024 -> 128256: 1 GiB of logits)."""
    require(backend)
    N, H, V = 4096, 1024, 128256
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")
    myext.linear_cross_entropy(x, w, target, backend=backend).backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    myext.linear_cross_entropy(x, w, target, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - (x.numel() + w.numel()) * x.element_size()
    logits = N * V * x.element_size()
    assert extra <= logits / 8, f"{extra / 2**20:.0f} MiB beyond the gradients, logits {logits / 2**20:.0f} MiB"


# --- which kernels ran -----------------------------------------------------------

def test_cuda_backend_runs_its_kernels():
    """backend="cuda" runs our CUDA kernels, with cuBLASLt's fused epilogue where the
    layout allows it and our own epilogue kernel where it does not."""
    require("cuda")
    x, w, b = linear_args(torch.randn(256, 784, device="cuda").to(torch.bfloat16), 128, torch.bfloat16)
    names = cuda_kernel_names(lambda: myext.linear_relu(x, w, b, backend="cuda").sum().backward())
    assert ran(names, "relu_grad_bias_kernel")
    assert not ran(names, "relu_kernel<"), "bias and ReLU should be fused into the cuBLASLt matmul"

    x_odd = misaligned((256, 784), torch.bfloat16)
    names = cuda_kernel_names(lambda: myext.linear_relu(x_odd, w.detach(), b.detach(), backend="cuda"))
    assert ran(names, "relu_kernel<")

    for classes, splits in ((32000, False), (128256, True)):
        x = torch.randn(64, classes, device="cuda", requires_grad=True)
        target = torch.randint(0, classes, (64,), device="cuda")
        names = cuda_kernel_names(lambda: myext.cross_entropy(x, target, backend="cuda").backward())
        assert ran(names, "forward_kernel") and ran(names, "backward_kernel")
        assert ran(names, "combine_kernel") == splits

    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    w = torch.randn(32000, 256, device="cuda", requires_grad=True)
    target = torch.randint(0, 32000, (512,), device="cuda")
    names = cuda_kernel_names(lambda: myext.linear_cross_entropy(x, w, target, chunk_size=128,
                                                                 backend="cuda").backward())
    assert ran(names, "forward_kernel") and ran(names, "backward_kernel")
