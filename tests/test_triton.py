"""The Triton backend beyond the shared matrix: that its kernels run, the edges of their
tiles and blocks, and its error on CPU tensors without the interpreter.

Without a GPU the kernels run in Triton's interpreter, one program after another in
Python, so the shapes here are as small as the edges they exercise allow.
"""

import itertools
import math
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
    kernels = {"gemm": triton_lr._gemm_kernel, "relu_grad": triton_lr._relu_grad_kernel,
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
    """Forward and backward launch our kernels: one GEMM forward; backward one pass for the
    masked gradient and the bias gradient (its GEMMs are torch.mm); one cross-entropy kernel
    each way. (Counted on a second call: on a GPU the first one autotunes, launching each
    configuration.)"""
    x = torch.randn(6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 5, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    target = torch.randint(0, 5, (6,), device=device)
    for _ in range(2):
        launches.clear()
        myext.linear_relu(x, w, b, backend="triton").sum().backward()
    assert launches == {"gemm": 1, "relu_grad": 1}
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


@pytest.mark.parametrize("capability,target", [((9, 0), "hopper"), ((10, 0), "hopper"), ((8, 0), "pre-hopper")])
def test_linear_relu_forward_configs_per_target(monkeypatch, capability, target):
    """A GPU gets its target's autotune list (Hopper's tiles from sm_90 on); the
    interpreter, one configuration: Hopper's first, 128 x 256 x 64."""
    monkeypatch.setattr(triton_lr, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    triton_lr._target.cache_clear()
    try:
        tuned = triton_lr._autotuned_gemm(torch.device("cuda", 0))
    finally:
        triton_lr._target.cache_clear()
    assert tuned is triton_lr._GEMM_BY_TARGET[target]
    assert triton_lr._HOPPER_CONFIGS[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}
    if os.environ.get("TRITON_INTERPRET") == "1":  # the lists as built at import
        assert [c.kwargs for c in triton_lr._GEMM_BY_TARGET["hopper"].configs] == [
            triton_lr._HOPPER_CONFIGS[0].kwargs]


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


def _backward_formula(grad_output, input, weight, output):
    """The three gradients from their definition, in float64."""
    g = (grad_output.double() * (output > 0)).reshape(-1, weight.shape[0])
    x = input.double().reshape(-1, weight.shape[1])
    return (g @ weight.double()).reshape(input.shape), g.t() @ x, g.sum(0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_relu_backward_output_mask(device, launches, monkeypatch):
    """Each gradient comes only when asked for, and only its work runs: the masked-gradient
    pass once if anything is asked (storing G only for a GEMM, summing it only for the
    bias), one torch.mm per asked GEMM."""
    x, w, b = _linear_case(9, 7, 5, torch.float64, device)
    op = myext.backends.kernels("triton").linear_relu_backward
    out = myext.linear_relu(x, w, b, backend="triton")
    grad = torch.randn_like(out)
    expected = _backward_formula(grad, x, w, out)
    flags = []

    def recorded(*args, _run=triton_lr._relu_grad_kernel.run, **kwargs):
        flags.append((kwargs["STORE_G"], kwargs["BIAS_GRAD"]))
        return _run(*args, **kwargs)

    monkeypatch.setattr(triton_lr._relu_grad_kernel, "run", recorded)
    # The op's body calls torch.mm by name: counted here (a dispatch mode would see the op only).
    gemms = []

    def mm(*args, _mm=torch.mm, **kwargs):
        gemms.append(args[0].shape)
        return _mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    for mask in itertools.product([False, True], repeat=3):
        launches.clear()
        flags.clear()
        gemms.clear()
        result = op(grad, x, w, out, list(mask))
        for wanted, got, want in zip(mask, result, expected):
            assert (got is None) == (not wanted)
            if wanted:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert launches["relu_grad"] == any(mask)
        assert flags == ([(mask[0] or mask[1], mask[2])] if any(mask) else [])
        assert len(gemms) == mask[0] + mask[1]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_relu_bias_gradient_sums_in_float32(device, dtype):
    """The bias gradient of 700 rows (three row blocks of the pass) is their float32 sum
    rounded once: exactly the float64 sum of the masked bf16/fp16 gradient, rounded to
    the dtype. Summed in the dtype itself it would drift by many of its ulps (at sums
    of a few hundred, bfloat16's ulp is 2: adding values near 1 one at a time stalls)."""
    rows, in_features, out_features = 700, 3, 4
    x = torch.randn(rows, in_features, device=device, dtype=dtype)
    w = torch.randn(out_features, in_features, device=device, dtype=dtype)
    grad = (1 + 0.25 * torch.randn(rows, out_features, device=device)).to(dtype)
    out = torch.randn(rows, out_features, device=device).to(dtype)
    op = myext.backends.kernels("triton").linear_relu_backward
    _, _, grad_bias = op(grad, x, w, out, [False, False, True])
    exact = (grad.double() * (out > 0)).sum(0)
    assert grad_bias.dtype == dtype
    assert torch.equal(grad_bias, exact.to(dtype)), (grad_bias, exact)
    # Ones over 700 rows: a sum in the dtype, one row at a time, would stop at 256 (bf16).
    _, _, ones_bias = op(torch.ones_like(grad), x, w, torch.ones_like(out), [False, False, True])
    assert torch.equal(ones_bias, torch.full_like(ones_bias, rows))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_relu_backward_strided_operands(device):
    """Transposed and sliced operands, read through their strides, and a 3-d input whose
    rows are no view (reshape copies): the gradients of the definition, NaN and inf of
    grad_output where the ReLU is off giving 0 as in torch's relu backward."""
    dtype = torch.float64
    rows, in_features, out_features = 35, 9, 6
    x = torch.randn(in_features, rows, dtype=dtype, device=device).t()
    w = torch.randn(in_features, out_features, dtype=dtype, device=device).t()
    out = torch.randn(out_features, rows, dtype=dtype, device=device).t()
    grad = torch.randn(rows, 2 * out_features, dtype=dtype, device=device)[:, ::2]
    grad.masked_fill_(out <= 0, float("nan"))
    grad[:, 0].masked_fill_(out[:, 0] <= 0, float("inf"))
    op = myext.backends.kernels("triton").linear_relu_backward
    expected = _backward_formula(torch.where(out > 0, grad, 0.0), x, w, out)
    for got, want in zip(op(grad, x, w, out, [True, True, True]), expected):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # (5, 7, F) permuted from (7, 5, F): its rows are a copy, its gradient of input's shape.
    x3 = torch.randn(7, 5, in_features, dtype=dtype, device=device).transpose(0, 1)
    out3 = torch.randn(5, 7, out_features, dtype=dtype, device=device)
    grad3 = torch.randn(7, 5, out_features, dtype=dtype, device=device).transpose(0, 1)
    expected = _backward_formula(grad3, x3, w, out3)
    for got, want in zip(op(grad3, x3, w, out3, [True, True, True]), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cross_entropy_softcap_of_huge_logits(device, dtype):
    """Soft-capped logits far past the cap, 11089.1 / 30 among them: exp(-2 |x| / cap)
    underflows there to a float64 subnormal, whose log no longer recovers the exponent,
    and a tanh (the interpreter's, from exp and log) taking expm1 by Kahan's formula
    from it came out 1e-5 short of 1 and the loss log(6) - 1.7e-5. Every logit caps to
    +-30 within rounding: the loss is log(6 + e^-60), the softmax 1/6 for the five at +30."""
    x = torch.tensor([[1341.8, 57337.2, -6930.9, 10377.8, 39540.8, 11089.1, 11523.3]], dtype=dtype,
                     device=device, requires_grad=True)
    target = torch.tensor([0], device=device)
    loss = myext.cross_entropy(x, target, softcap=30.0, reduction="sum", backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double()
    e = torch.exp(-2 * x64.abs() / 30)
    softmax = torch.tensor([[1, 1, math.exp(-60), 1, 1, 1, 1]], dtype=torch.float64, device=device) / 6
    onehot = torch.nn.functional.one_hot(target, 7).double()
    rtol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), torch.tensor(math.log(6), dtype=torch.float64, device=device),
                               rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), (softmax - onehot) * 4 * e / (1 + e) ** 2, rtol=rtol,
                               atol=float(torch.finfo(dtype).tiny))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cross_entropy_target_probability_underflows(device, dtype):
    """The target's gradient p - 1 where p underflows to a subnormal (log p = -720 in
    float64, -95 in float32): exactly -1, not Kahan's expm1 from the subnormal's few bits."""
    gap = 720.0 if dtype == torch.float64 else 95.0
    x = torch.tensor([[0.0, gap]], dtype=dtype, device=device, requires_grad=True)
    target = torch.tensor([0], device=device)
    (grad,) = torch.autograd.grad(myext.cross_entropy(x, target, reduction="sum", backend="triton"), x)
    assert grad[0, 0].item() == -1.0


def test_cross_entropy_out_of_range_class():
    """Called directly, as a compiled graph does with no Python check, the op asserts on an
    out-of-range class index (on a GPU asynchronously, without a host sync; here, under the
    interpreter, at once); its kernels, launched without that check, read nothing out of
    bounds and make the row NaN."""
    ops = myext.backends.kernels("triton")
    x = torch.randn(3, 4)
    target = torch.tensor([0, 9, -100])
    with pytest.raises(RuntimeError, match="class index is outside"):
        ops.cross_entropy_forward(x, target, None, None, 0, -100, 0.0, 0.0, 0.0, 1.0, False)
    outputs = [torch.empty(3) for _ in range(5)]
    triton_ce._launch(triton_ce._cross_entropy_forward_kernel, x, target, x, x, *outputs, outputs[0], 3, 4, -100,
                      0.0, 0.0, 0.0, 1.0, *x.stride(), target.stride(0), 0, input=x, target=target, weight=None,
                      sample_weight=None, label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, temperature=1.0,
                      ENTROPY=False)
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
