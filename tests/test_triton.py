"""The Triton backend beyond the shared matrix: that its kernels run, the edges of their
tiles and blocks, and its error on CPU tensors without the interpreter.

Without a GPU the kernels run in Triton's interpreter, one program after another in
Python, so the shapes here are as small as the edges they exercise allow.
"""

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import myext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif("triton" not in myext.available_backends(), reason="Triton is not available")

if "triton" in myext.available_backends():
    import myext_triton_ops.cross_entropy as triton_ce
    import myext_triton_ops.linear_relu as triton_lr

TRITON_DEVICES = [pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [])
                  for d in DEVICES if "triton" in myext.available_backends(d)]


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of each of the backend's Triton kernels, by name."""
    counts = Counter()
    kernels = {"gemm": triton_lr._gemm_kernel, "column_sum": triton_lr._masked_column_sum_kernel,
               "ce_forward": triton_ce._cross_entropy_forward_kernel,
               "ce_backward": triton_ce._cross_entropy_backward_kernel}
    for name, kernel in kernels.items():
        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            counts[_name] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return counts


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernels_run(device, launches):
    """Forward and backward launch our kernels: one GEMM forward, two GEMMs backward with the
    bias gradient inside the second; one cross-entropy kernel each way. (Counted on a second
    call: on a GPU the first one autotunes, launching each configuration.)"""
    x = torch.randn(6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 5, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    target = torch.randint(0, 5, (6,), device=device)
    for _ in range(2):
        launches.clear()
        myext.linear_relu(x, w, b, backend="triton").sum().backward()
    assert launches == {"gemm": 3}
    for _ in range(2):
        launches.clear()
        myext.cross_entropy(x, target, backend="triton").backward()
    assert launches == {"ce_forward": 1, "ce_backward": 1}


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_cross_entropy_runs_the_row_kernels_per_chunk(device, launches):
    """Fused linear cross-entropy in chunks of 4 rows of 10: for 'mean' forward runs
    both row kernels on each of the 3 chunks (the gradients in the same pass) and
    backward none; for 'none' forward runs the loss kernel, backward the gradient one."""
    x = torch.randn(10, 5, device=device, requires_grad=True)
    w = torch.randn(7, 5, device=device, requires_grad=True)
    target = torch.randint(0, 7, (10,), device=device)
    for _ in range(2):
        launches.clear()
        myext.linear_cross_entropy(x, w, target, chunk_size=4, backend="triton").backward()
    assert launches == {"ce_forward": 3, "ce_backward": 3}
    launches.clear()
    myext.linear_cross_entropy(x, w, target, reduction="none", chunk_size=4, backend="triton").sum().backward()
    assert launches == {"ce_forward": 3, "ce_backward": 3}


def test_schemas_match_the_core_ops():
    """The ops have the schemas of their myext:: counterparts, in both registration modes."""
    for name in (op for spec in myext.registry.specs() for op in spec.dispatcher_ops):
        ours = getattr(torch.ops.myext, name + "_triton").default._schema
        core = getattr(torch.ops.myext, name).default._schema
        assert str(ours) == str(core).replace(f"myext::{name}(", f"myext::{name}_triton(")


# --- linear_relu ---------------------------------------------------------------

def _linear_case(rows, in_features, out_features, dtype, device):
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    w = (torch.randn(out_features, in_features, dtype=dtype, device=device) / max(in_features, 1) ** 0.5)
    b = torch.randn(out_features, dtype=dtype, device=device)
    return x, w, b


def _check_linear(x, w, b, rtol, atol):
    """Output and all gradients against F.linear + F.relu computed in float64."""
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    out = myext.linear_relu(x, w, b, backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.relu(F.linear(*ref_inputs))
    # Gradients under our own ReLU mask: a pre-activation that rounds to the other side of
    # zero moves a whole entry, which says nothing about the backward kernels.
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double() * (out.detach() > 0))
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for g, g_ref in zip(grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == g_ref.shape
        torch.testing.assert_close(g.double(), g_ref, rtol=rtol, atol=atol)


# Sizes against the tiles: the GEMM's first configuration (the one the interpreter uses)
# is 128 x 256 x 64, float64's 16 x 16 x 16. Each case leaves a partial tile in every
# dimension of the forward and both backward GEMMs, or is degenerate.
LINEAR_EDGES = {
    "partial-tiles": (130, 70, 300, torch.float32),
    "partial-tiles-fp64": (37, 21, 18, torch.float64),
    "one-row": (1, 70, 5, torch.float32),
    "one-feature": (3, 1, 1, torch.float64),
    "no-rows": (0, 5, 3, torch.float32),
    "no-in-features": (4, 0, 3, torch.float32),
}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", LINEAR_EDGES)
def test_linear_relu_tile_edges(device, case):
    rows, in_features, out_features, dtype = LINEAR_EDGES[case]
    _check_linear(*_linear_case(rows, in_features, out_features, dtype, device), **TOLERANCES[dtype])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_relu_half_precision(device, dtype):
    # Summed over 70 products, rounded once to the dtype.
    x, w, b = _linear_case(33, 70, 40, dtype, device)
    _check_linear(x, w, b, rtol=TOLERANCES[dtype]["rtol"], atol=4 * TOLERANCES[dtype]["atol"])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_relu_backward_output_mask(device, launches):
    """Each gradient comes only when asked for; the bias gradient alone has its own kernel."""
    x, w, b = _linear_case(9, 7, 5, torch.float64, device)
    op = myext.backends.kernels("triton").linear_relu_backward
    out = myext.linear_relu(x, w, b, backend="triton")
    grad = torch.randn_like(out)
    full = op(grad, x, w, out, [True, True, True])
    for mask in itertools.product([False, True], repeat=3):
        launches.clear()
        result = op(grad, x, w, out, list(mask))
        for wanted, got, expected in zip(mask, result, full):
            assert (got is None) == (not wanted)
            if wanted:
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert launches["column_sum"] == (mask[2] and not mask[1])


# --- cross_entropy -------------------------------------------------------------

def _check_cross_entropy(x, target, weight=None, **kwargs):
    """Loss and gradient against F.cross_entropy computed in float64."""
    x = x.detach().requires_grad_()
    loss = myext.cross_entropy(x, target, weight, **kwargs, backend="triton")
    grad_loss = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    x64 = x.detach().double().requires_grad_()
    loss64 = F.cross_entropy(x64, target.double() if target.is_floating_point() else target,
                             weight.double() if weight is not None else None, **kwargs)
    (grad64,) = torch.autograd.grad(loss64, x64, grad_loss.double())
    tolerance = TOLERANCES[x.dtype]
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    torch.testing.assert_close(loss.double(), loss64, **tolerance)
    torch.testing.assert_close(grad.double(), grad64, **tolerance)


def _ce_case(rows, classes, kind, dtype, device):
    x = (torch.randn(rows, classes, device=device) * 3).to(dtype)
    if kind == "class":
        target = torch.randint(0, classes, (rows,), device=device)
        target[1::3] = -100
    else:
        target = torch.softmax(torch.randn(rows, classes, device=device), dim=1).to(dtype)
    weight = (torch.rand(classes, device=device) + 0.5).to(dtype)
    return x, target, weight


CE_OPTIONS = [dict(weighted=weighted, label_smoothing=smoothing, reduction=reduction)
              for (weighted, smoothing), reduction in itertools.product(
                  [(False, 0.0), (True, 0.0), (True, 0.3)], ["none", "mean", "sum"])]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_cross_entropy_many_blocks(device, kind, options, monkeypatch):
    """Rows of several blocks, the last one partial (37 classes in blocks of 16), and programs of
    stacked rows, the last one partial (5 rows of 5 classes, two rows a program)."""
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_C", 16)
    options = dict(options)
    for rows, classes in [(4, 37), (5, 5)]:
        x, target, weight = _ce_case(rows, classes, kind, torch.float32, device)
        _check_cross_entropy(x, target, weight if options["weighted"] else None,
                             **{k: v for k, v in options.items() if k != "weighted"})


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_cross_entropy_gradcheck_many_blocks(device, kind, monkeypatch):
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_C", 4)
    x, target, weight = _ce_case(2, 9, kind, torch.float64, device)
    x.requires_grad_()
    fn = lambda x: myext.cross_entropy(x, target, weight, label_smoothing=0.2, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("shape", [(1, 7), (6, 1), (1, 1)], ids=str)
def test_cross_entropy_single_row_or_class(device, kind, shape):
    x, target, weight = _ce_case(*shape, kind, torch.float64, device)
    for reduction in ("none", "mean", "sum"):
        _check_cross_entropy(x, target, weight, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_cross_entropy_half_precision(device, dtype, kind):
    """Computed in float32 and rounded once, so within the dtype's rounding of float64."""
    x, target, weight = _ce_case(7, 300, kind, dtype, device)
    _check_cross_entropy(x, target, weight, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_cross_entropy_leading_block_of_minus_inf(device, monkeypatch):
    """A row whose first blocks hold only -inf has no finite max yet; nothing turns NaN."""
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_C", 4)
    x = torch.randn(2, 11, device=device)
    x[:, :8] = float("-inf")
    target = torch.tensor([9, 10], device=device)
    _check_cross_entropy(x, target, reduction="none")


def test_cross_entropy_out_of_range_class():
    """Called directly, as a compiled graph does with no Python check, the op asserts on an
    out-of-range class index (on a GPU asynchronously, without a host sync; here, under the
    interpreter, at once); its kernels, launched without that check, read nothing out of
    bounds and make the row NaN."""
    ops = myext.backends.kernels("triton")
    x = torch.randn(3, 4)
    target = torch.tensor([0, 9, -100])
    with pytest.raises(RuntimeError, match="class index is outside"):
        ops.cross_entropy_forward(x, target, None, 0, -100, 0.0, 0.0, 0.0)
    outputs = [torch.empty(3) for _ in range(5)]
    triton_ce._launch(triton_ce._cross_entropy_forward_kernel, x, target, x, *outputs, 3, 4, -100, 0.0, 0.0, 0.0,
                      *x.stride(), target.stride(0), 0, input=x, target=target, weight=None, label_smoothing=0.0,
                      lse_square_scale=0.0, softcap=0.0)
    loss = outputs[0]
    assert not loss[0].isnan() and loss[1].isnan() and loss[2] == 0


# --- where the backend runs ----------------------------------------------------

def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET, backend="triton" refuses CPU tensors and says why."""
    code = ("import torch, myext\n"
            "myext.linear_relu(torch.randn(2, 3), torch.randn(4, 3), backend='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "ValueError: backend='triton' cannot run on cpu tensors here" in result.stderr, result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr, result.stderr


def test_triton_ops_imported_before_myext():
    """The Triton package (the folder triton_ops/, imported as myext_triton_ops) depends on
    nothing of myext: importing it (and its kernels) first, in a fresh interpreter, leaves
    backend="triton" working, and nothing imports a top-level triton_ops."""
    code = ("import sys, myext_triton_ops, myext_triton_ops.cross_entropy, myext_triton_ops.linear_relu\n"
            "assert 'myext' not in sys.modules\n"
            "import torch, myext\n"
            "x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)\n"
            "out = myext.linear_relu(x, w, backend='triton')\n"
            "loss = myext.cross_entropy(out, torch.tensor([0, 4, 2]), backend='triton')\n"
            "loss.backward()\n"
            "expected = torch.nn.functional.cross_entropy(torch.relu(x @ w.t()), torch.tensor([0, 4, 2]))\n"
            "torch.testing.assert_close(loss, expected)\n"
            "assert 'triton_ops' not in sys.modules\n"
            "print(myext.available_backends('cpu'))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['cpp', 'triton', 'torch']"
