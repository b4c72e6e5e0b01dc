"""Property-based tests: hypothesis draws the cases we did not think of.

Shapes (empty, 1-d, N-d, sizes around the kernels' vector widths and block lengths,
primes), dtypes, layouts (transposed, sliced with a step), options (z-loss,
soft-capping and a language model's: temperature, per-token weights, shift, the exact
normalizer) and logit scales;
each backend against the op's reference with a float64 ground truth, under
myext.testing's rule: our error at most twice PyTorch's own (F.cross_entropy's,
F.linear's) in that dtype plus four units of the dtype's rounding at the largest true
value. Derandomized, so a run is repeatable; a failure prints the falsifying example.
The Triton interpreter runs a few small examples only.
"""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import myext
from myext import registry, testing
from myext.testing import Sample

DEVICE = "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Around the CPU kernels' vector widths (8/16 lanes), their few-classes path (32) and
# block (2048), and primes.
SIZES = [1, 2, 3, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 47, 64, 65, 97, 127, 2047, 2049]
SMALL_SIZES = [s for s in SIZES if s <= 65]


def derandomized(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# The interpreter takes about a second an example: Triton gets a few small ones (fewer
# for the fused linear cross-entropy, whose chunks each launch two kernels).
MANY, FEW = derandomized(1500), derandomized(60)


def backends_of(op, interpreted):
    """The compiled backends of ``op`` here, the interpreted Triton apart."""
    return [b for b in myext.available_backends(DEVICE, op=op) if b != "torch" and (b == "triton") == interpreted]


def laid_out(data, shape, layout, scale=1.0):
    """A float64 tensor of ``shape``: contiguous, transposed (its last two dimensions), or
    a slice with a step of a wider one."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator, dtype=torch.float64)
        return base.transpose(-1, -2) * scale
    if layout == "strided":
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64) * scale
        return base[..., ::2]
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def assert_agrees(op, backend, sample, dtype, terms=1, amplification=1.0):
    """terms: the most products one result sums (a GEMM's inner size). Two float32 (or
    float64) sums of the same products in another order differ by about sqrt(terms)
    roundings of the accumulator, which the floor allows beside twice PyTorch's error,
    as tests/test_gpu.py's rule does; times ``amplification`` where a later step
    multiplies such a difference (a logit's rounding moves the softmax's gradient by
    the logits' spread times as much)."""
    spec = registry.get(op)
    fn = functools.partial(spec.function, backend=backend)
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    floor_ulps = 4.0 + amplification * terms ** 0.5 * torch.finfo(accumulator).eps / torch.finfo(dtype).eps
    report = testing.check(fn, spec.reference, [sample], checks=["vs reference"], dtypes=(dtype,),
                           baseline=spec.baseline, floor_ulps=floor_ulps)
    report.assert_ok()


def cross_entropy_case(backend, data):
    sizes = SMALL_SIZES if backend == "triton" else SIZES
    classes = data.draw(st.sampled_from(sizes), label="classes")
    rank = data.draw(st.sampled_from([1, 2, 2, 3]), label="rank")
    rows = data.draw(st.integers(0 if rank > 1 else 1, 6), label="rows")
    shape = (classes,) if rank == 1 else (rows, classes) if rank == 2 else (rows, classes, 2)
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]), label="layout")
    scale = data.draw(st.sampled_from([1.0, 10.0, 1e3, 3e4]), label="logit scale")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    kind = data.draw(st.sampled_from(["class", "prob"]), label="target")
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]), label="reduction")
    smoothing = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="label_smoothing")
    weighted = data.draw(st.booleans(), label="weighted")
    lse_square_scale = data.draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1]), label="lse_square_scale")
    softcap = data.draw(st.sampled_from([None, None, 5.0, 30.0]), label="softcap")

    logits = laid_out(data, shape, layout, scale).requires_grad_()
    kwargs = dict(reduction=reduction, label_smoothing=smoothing, lse_square_scale=lse_square_scale, softcap=softcap)
    batch = shape[:0] if rank == 1 else shape[:1] + shape[2:]
    if kind == "class":
        target = torch.randint(0, classes, batch, generator=torch.Generator().manual_seed(rows))
        if target.numel() > 1 and data.draw(st.booleans(), label="ignore some"):
            target.view(-1)[::2] = -100
        args = (logits, target)
    else:
        probabilities = torch.softmax(laid_out(data, shape, layout), dim=0 if rank == 1 else 1)
        args = (logits, probabilities.requires_grad_())
    if weighted:
        kwargs["weight"] = torch.rand(classes, generator=torch.Generator().manual_seed(classes),
                                      dtype=torch.float64) + 0.25
    kwargs.update(lm_options(data, batch, kind, reduction))
    assert_agrees("cross_entropy", backend, Sample(args, kwargs), dtype)


def lm_options(data, batch, kind, reduction):
    """A language model's options, drawn: temperature, per-element weights (some 0),
    a shift along the batch shape's last dimension, the exact normalizer."""
    options = dict(temperature=data.draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]), label="temperature"))
    if data.draw(st.booleans(), label="sample_weight"):
        weights = torch.rand(batch, generator=torch.Generator().manual_seed(len(batch)), dtype=torch.float64) * 2
        if weights.numel() > 2:
            weights.view(-1)[2] = 0.0
        options["sample_weight"] = weights
    if kind == "class" and len(batch) and batch[-1] > 1:
        options["shift"] = data.draw(st.sampled_from([0, 0, 1, batch[-1] - 1]), label="shift")
    if reduction == "mean" and data.draw(st.booleans(), label="normalizer"):
        options["normalizer"] = data.draw(st.sampled_from([1.0, 7.0, 1e3]), label="normalizer value")
    return options


def linear_relu_case(backend, data):
    sizes = SMALL_SIZES
    in_features = data.draw(st.sampled_from([0, *sizes]), label="in_features")
    out_features = data.draw(st.sampled_from([0, *sizes]), label="out_features")
    rank = data.draw(st.sampled_from([1, 2, 2, 3]), label="rank")
    leading = [data.draw(st.integers(0, 9), label="rows") for _ in range(rank - 1)]
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]), label="layout")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bias = data.draw(st.booleans(), label="bias")
    x = laid_out(data, (*leading, in_features), layout)
    w = laid_out(data, (out_features, in_features), layout) / max(in_features, 1) ** 0.5
    args = [x.requires_grad_(), w.requires_grad_()]
    if bias:
        args.append(laid_out(data, (out_features,), layout).requires_grad_())
    assert_agrees("linear_relu", backend, Sample(tuple(args)), dtype)


def linear_cross_entropy_case(backend, data):
    features = data.draw(st.sampled_from([0, *SMALL_SIZES]), label="features")
    classes = data.draw(st.sampled_from(SMALL_SIZES if backend == "triton" else SIZES), label="classes")
    rank = data.draw(st.sampled_from([1, 2, 2, 3]), label="rank")
    leading = [data.draw(st.integers(0 if rank > 1 else 1, 9), label="rows") for _ in range(rank - 1)]
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]), label="layout")
    scale = data.draw(st.sampled_from([1.0, 10.0, 100.0]), label="logit scale")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    kind = data.draw(st.sampled_from(["class", "prob"]), label="target")
    kwargs = dict(
        reduction=data.draw(st.sampled_from(["none", "mean", "sum"]), label="reduction"),
        label_smoothing=data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="label_smoothing"),
        lse_square_scale=data.draw(st.sampled_from([0.0, 0.0, 1e-3]), label="lse_square_scale"),
        softcap=data.draw(st.sampled_from([None, None, 5.0]), label="softcap"),
        chunk_size=data.draw(st.sampled_from([None, 1, 2, 3, 7]), label="chunk_size"),
    )
    batch = tuple(leading)
    x = laid_out(data, (*batch, features), layout).requires_grad_()
    w = (laid_out(data, (classes, features), layout) * scale / features ** 0.5).requires_grad_()
    if data.draw(st.booleans(), label="bias"):
        kwargs["linear_bias"] = laid_out(data, (classes,), layout).requires_grad_()
    if data.draw(st.booleans(), label="weighted"):
        kwargs["weight"] = torch.rand(classes, generator=torch.Generator().manual_seed(classes),
                                      dtype=torch.float64) + 0.25
    if kind == "class":
        target = torch.randint(0, classes, batch, generator=torch.Generator().manual_seed(features))
        if target.numel() > 1 and data.draw(st.booleans(), label="ignore some"):
            target.view(-1)[::2] = -100
    else:
        target = torch.softmax(laid_out(data, (*batch, classes), layout), dim=-1).requires_grad_()
    kwargs.update(lm_options(data, batch, kind, kwargs["reduction"]))
    rows = x.numel() // max(features, 1)
    assert_agrees("linear_cross_entropy", backend, Sample((x, w, target), kwargs), dtype,
                  terms=max(features, classes, rows), amplification=1.0 + scale)


@pytest.mark.parametrize("backend", backends_of("cross_entropy", interpreted=False))
@MANY
@given(data=st.data())
def test_cross_entropy_properties(backend, data):
    cross_entropy_case(backend, data)


@pytest.mark.parametrize("backend", backends_of("cross_entropy", interpreted=True))
@FEW
@given(data=st.data())
def test_cross_entropy_properties_interpreted(backend, data):
    cross_entropy_case(backend, data)


@pytest.mark.parametrize("backend", backends_of("linear_relu", interpreted=False))
@MANY
@given(data=st.data())
def test_linear_relu_properties(backend, data):
    linear_relu_case(backend, data)


@pytest.mark.parametrize("backend", backends_of("linear_relu", interpreted=True))
@FEW
@given(data=st.data())
def test_linear_relu_properties_interpreted(backend, data):
    linear_relu_case(backend, data)


@pytest.mark.parametrize("backend", backends_of("linear_cross_entropy", interpreted=False))
@MANY
@given(data=st.data())
def test_linear_cross_entropy_properties(backend, data):
    linear_cross_entropy_case(backend, data)


@pytest.mark.parametrize("backend", backends_of("linear_cross_entropy", interpreted=True))
@derandomized(25)
@given(data=st.data())
def test_linear_cross_entropy_properties_interpreted(backend, data):
    linear_cross_entropy_case(backend, data)
