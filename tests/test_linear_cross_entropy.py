"""myext.linear_cross_entropy on every backend, against F.cross_entropy of F.linear's logits.

The generic battery (tests/test_ops.py) runs gradcheck, gradgradcheck, opcheck, compile
and the float64 ground-truth rule on the op's samples; these tests add what is the
fused op's own: every option against PyTorch, chunk-size invariance, batch shapes,
the gradients computed in forward, and bad arguments.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import myext

# Tests taking backend and device run on every backend of the op (conftest.py).
OP = "linear_cross_entropy"
REDUCTIONS = ["none", "mean", "sum"]


def make_case(batch=(9,), features=8, classes=11, *, kind="class", bias=True, weighted=False, dtype=torch.float64,
              device="cpu", scale=2.0, ignore_index=-100):
    """Hidden states ``(*batch, features)``, a head whose logits spread about ``scale``,
    a bias, class weights and a target (class indices with one ignored, or probabilities)."""
    x = torch.randn(*batch, features, dtype=torch.float64)
    w = torch.randn(classes, features, dtype=torch.float64) * scale / features ** 0.5
    b = torch.randn(classes, dtype=torch.float64) if bias else None
    if kind == "class":
        target = torch.randint(0, classes, batch)
        if target.numel() > 1:
            target.view(-1)[1] = ignore_index
    else:
        target = torch.softmax(torch.randn(*batch, classes, dtype=torch.float64), dim=-1).to(dtype)
    weight = torch.rand(classes, dtype=torch.float64).add(0.5).to(dtype) if weighted else None

    def on_device(t):
        return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return on_device(x), on_device(w), on_device(b), target.to(device), on_device(weight)


def loss_and_grads(fn, x, w, b, target, upstream=None, **kwargs):
    """The loss and the gradients of (input, linear_weight, linear_bias) under ``upstream``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss = fn(leaves[0], leaves[1], target, linear_bias=leaves[2], **kwargs)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt, upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), grads


def pytorch_linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, **kwargs):
    """F.cross_entropy of F.linear's logits (F.linear_cross_entropy's definition)."""
    classes = linear_weight.shape[0]
    logits = F.linear(input, linear_weight, linear_bias)
    flat = target.reshape(-1, classes) if target.is_floating_point() else target.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, classes), flat, **kwargs)
    return loss.reshape(input.shape[:-1]) if kwargs.get("reduction") == "none" else loss


TOLERANCES = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
AGREEMENT_CASES = list(itertools.product(["class", "prob"], [(False, 0.0), (True, 0.1)], REDUCTIONS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,weighted_smoothing,reduction", AGREEMENT_CASES, ids=str)
def test_matches_pytorch(backend, device, dtype, kind, weighted_smoothing, reduction):
    """Loss and gradients as F.cross_entropy(F.linear(...)) computes them in float64,
    within the dtype's rounding; reduction 'none' under a random upstream gradient."""
    weighted, smoothing = weighted_smoothing
    x, w, b, target, weight = make_case((37,), 16, 70, kind=kind, weighted=weighted, dtype=dtype, device=device)
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    upstream = torch.randn(37, dtype=dtype, device=device) if reduction == "none" else None
    loss, grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, chunk_size=8,
                                 backend=backend, **options)
    as64 = [t.double() if t is not None else None for t in (x, w, b)]
    target64 = target.double() if kind == "prob" else target
    options64 = dict(options, weight=weight.double() if weighted else None)
    want, want_grads = loss_and_grads(pytorch_linear_cross_entropy, *as64, target64,
                                      upstream.double() if upstream is not None else None, **options64)
    assert loss.dtype == dtype and loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, **TOLERANCES[dtype])
    for got, expected in zip(grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_reduced_weight_gradient_over_class_blocks(dtype):
    """The cpp kernels compute the weight gradient of a bfloat16 or half step over more
    than one chunk of rows by blocks of classes, each block's logits made again for every
    row and its gradient one GEMM (no float32 accumulator). Three chunks give blocks of
    832 classes and a ragged last one of 436 that holds the targets and, through its
    bias, most of the softmax, so that most entries of its gradient are large (a lost
    block or tail fails): the float64 gradients within the dtype's rounding."""
    x, w, b, _, _ = make_case((20,), 19, 2100, dtype=dtype)
    b = b.clone()
    b[2048:] += 6.0
    target = torch.randint(2048, 2100, (20,))
    loss, grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, chunk_size=8, reduction="sum",
                                 backend="cpp")
    as64 = [t.double() for t in (x, w, b)]
    want, want_grads = loss_and_grads(pytorch_linear_cross_entropy, *as64, target, reduction="sum")
    # bfloat16 rounds the last block's logits (about 6) to 0.03.
    tolerance = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-2, atol=3e-3)
    torch.testing.assert_close(loss.double(), want, **tolerance)
    for got, expected in zip(grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_reduced_weight_gradient_accumulated(dtype):
    """Where a float32 accumulator of the weight gradient is no larger than the logits
    (rows >= 2 x features in bfloat16), the cpp kernels add each chunk's product into it, a
    block of 2048 classes at a time, widening the product as they read it: 400 rows of 8
    features in chunks of 64 over 2100 classes (a ragged last block of 52 that holds the
    targets). The same gradients, but for float32's order of summation, as one chunk of
    every row (one GEMM, no accumulator), whose logits round alike."""
    x, w, b, _, _ = make_case((400,), 8, 2100, dtype=dtype)
    b = b.clone()
    b[2048:] += 6.0
    target = torch.randint(2048, 2100, (400,))
    loss, grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, chunk_size=64, reduction="sum",
                                 backend="cpp")
    whole_loss, whole_grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, chunk_size=400,
                                             reduction="sum", backend="cpp")
    torch.testing.assert_close(loss, whole_loss, rtol=0, atol=0)
    for got, expected in zip(grads, whole_grads):
        assert got.dtype == dtype
        # A rounding of the dtype at the gradient's scale (entries up to about 4, where
        # bfloat16 steps by 1/64): float32 sums the cancelling rows in another order.
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-2, atol=2e-2)


@pytest.mark.compiled_backends
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accum_dtype_of_the_input_sums_in_the_gradient(backend, device, dtype, reduction):
    """accum_dtype set to the input's dtype sums the weight gradient over the chunks in
    the gradient itself: 400 rows of 8 features in 7 chunks over 300 classes, the
    gradients from forward's pass (mean) and from the backward op (none). The loss and
    the input's and bias's gradients are the default's bits (neither is summed over
    chunks in the dtype); the weight's differs from the default's (float32) by at most
    a rounding of the dtype per chunk and two more, at the scale of the sum of its
    terms' magnitudes (a lost or doubled chunk is many times that)."""
    x, w, b, target, _ = make_case((400,), 8, 300, dtype=dtype, device=device)
    upstream = torch.rand(400, dtype=dtype, device=device).add(0.5) if reduction == "none" else None

    def run(**accum):
        return loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, chunk_size=64,
                              reduction=reduction, backend=backend, **accum)

    loss, grads = run(accum_dtype=dtype)
    default_loss, default_grads = run()
    assert grads[1].dtype == dtype
    torch.testing.assert_close(loss, default_loss, rtol=0, atol=0)
    for got, expected in zip(grads[::2], default_grads[::2]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The logits' gradient in float64, each row scaled as the loss scales it.
    x64 = x.double()
    d = torch.softmax(F.linear(x64, w.double(), b.double()), dim=1)
    kept = target != -100
    d[kept.nonzero().squeeze(1), target[kept]] -= 1
    d = d * kept[:, None] * (upstream.double()[:, None] if upstream is not None else 1 / kept.sum())
    magnitude = d.abs().t() @ x64.abs()
    chunks = 7
    error = (grads[1].double() - default_grads[1].double()).abs()
    assert (error <= (chunks + 2) * torch.finfo(dtype).eps * magnitude).all(), \
        (error / magnitude.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_bfloat16_class_blocks_with_options(kind, reduction):
    """The blocks of classes of the bfloat16 weight gradient with every option that
    reads a row beyond its block: class weights and label smoothing (the row's sum(w q)
    and the weights' sum over every class), the z-loss and soft-capping (the whole row's
    log-sum-exp), probability targets (each block's columns of them), and an upstream
    gradient per row. 40 rows in chunks of 8 make blocks of 256 classes (the least) of
    700: against float64, within bfloat16's rounding, as one chunk of every row (no
    blocks) is."""
    x, w, b, target, weight = make_case((40,), 24, 700, kind=kind, weighted=True, dtype=torch.bfloat16)
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    upstream = torch.randn(40, dtype=torch.bfloat16) if reduction == "none" else None
    as64 = [t.double() for t in (x, w, b)]
    target64 = target.double() if kind == "prob" else target
    want, want_grads = loss_and_grads(pytorch_linear_cross_entropy, *as64, target64,
                                      upstream.double() if upstream is not None else None,
                                      **dict(options, weight=weight.double()))
    for chunk in (8, 40):
        loss, grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, chunk_size=chunk,
                                     backend="cpp", **options)
        torch.testing.assert_close(loss.double(), want, **TOLERANCES[torch.bfloat16])
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.bfloat16])
    capped = dict(options, lse_square_scale=0.01, softcap=3.0)
    blocked = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, chunk_size=8, backend="cpp",
                             **capped)
    whole = loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, chunk_size=40, backend="cpp",
                           **capped)
    torch.testing.assert_close(blocked[0], whole[0], rtol=0, atol=0)
    for got, expected in zip(blocked[1], whole[1]):
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-2, atol=1e-3)


def test_cpp_bfloat16_class_blocks_of_a_shard():
    """The shard's backward (vocabulary parallelism) in bfloat16 over three chunks: the
    blocks of classes of its weight gradient start at the shard's first class and read
    the rows' statistics and sum(w q) of every class. Against the same call in float64
    (no blocks there), within bfloat16's rounding."""
    classes, start, held = 1000, 100, 700
    x, w_all, b_all, target, _ = make_case((24,), 16, classes)
    logits = F.linear(x, w_all, b_all)
    row_max = logits.amax(1)
    row_log_sum = (logits - row_max[:, None]).exp().sum(1).log()
    eps = 0.1
    row_weight = torch.where(target == -100, 0.0, 1 - eps + eps).double()
    upstream = torch.randn(24, dtype=torch.float64)
    w, b = w_all[start:start + held], b_all[start:start + held]

    def shard_grads(dtype, chunk, accum_dtype=None):
        as_dtype = [t.to(dtype) for t in (upstream, x, w, b)]
        stats = [t.to(torch.float32 if dtype == torch.bfloat16 else dtype) for t in (row_max, row_log_sum, row_weight)]
        total = torch.tensor(0.0, dtype=stats[0].dtype)
        return torch.ops.myext.linear_cross_entropy_shard_backward(
            *as_dtype, target, None, None, stats[0], stats[1], stats[2], total,
            torch.tensor(float(classes), dtype=stats[0].dtype), None, None, None, 0, -100, eps, 0.0, 0.0, 1.0,
            False, start, classes, chunk, [True, True, True], accum_dtype)

    rounded = [t.to(torch.bfloat16).double() for t in (upstream, x, w, b)]
    upstream, x, w, b = rounded
    want = shard_grads(torch.float64, 0)
    # accum_dtype=bfloat16 sums over the three chunks in the gradient itself instead: the
    # input's and bias's gradients the same bits, the weight's within bfloat16's rounding.
    blocks, summed = shard_grads(torch.bfloat16, 8), shard_grads(torch.bfloat16, 8, torch.bfloat16)
    for got, in_dtype, expected in zip(blocks, summed, want):
        assert got.dtype == in_dtype.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.bfloat16])
        torch.testing.assert_close(in_dtype.double(), expected, **TOLERANCES[torch.bfloat16])
    for got, in_dtype in zip(blocks[::2], summed[::2]):
        assert torch.equal(got, in_dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_chunk_size_invariance(backend, device, reduction, kind):
    """Every chunk size gives the same loss and gradients, from one row a chunk to all."""
    x, w, b, target, weight = make_case((13,), 6, 9, kind=kind, weighted=True, device=device)
    upstream = torch.randn(13, dtype=torch.float64, device=device) if reduction == "none" else None
    results = [loss_and_grads(myext.linear_cross_entropy, x, w, b, target, upstream, weight=weight,
                              reduction=reduction, label_smoothing=0.1, lse_square_scale=0.01, softcap=5.0,
                              chunk_size=chunk, backend=backend)
               for chunk in (1, 2, 5, 13, 100, None)]
    first_loss, first_grads = results[0]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, first_loss, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, first_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows, classes", [(4096, 32000), (4000, 32000), (4096, 128000), (2048, 256000),
                                           (2100, 128000), (1024, 128000), (100, 32000), (64, 10**6), (1, 50),
                                           (0, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunk_size(rows, classes, dtype):
    """The default chunk: as few chunks as keep each within about 32 MiB of logits, or
    where the vocabulary is too large for that within 256 rows (the rows a GEMM needs
    to run at full speed) or 1/8 of them if fewer (the memory budget); the rows shared
    about equally among them. The Triton ops choose by the same rule."""
    from myext.ops.linear_cross_entropy import default_chunk_size
    from triton_ops.linear_cross_entropy import chunk_rows

    chunk = default_chunk_size(rows, classes, dtype)
    fit = (32 << 20) // (classes * dtype.itemsize)
    most = max(1, min(rows, max(fit, min(256, rows // 8))))
    assert 1 <= chunk <= most
    chunks = -(-rows // chunk)
    assert chunks == -(-rows // most)
    if rows:
        last = rows - (chunks - 1) * chunk
        assert chunk - last < chunks
    if (rows, classes) == (4096, 32000):
        assert chunk == {torch.float32: 256, torch.bfloat16: 512}[dtype]
    assert chunk_rows(rows, classes, dtype.itemsize, 0) == chunk


def test_cpp_op_default_chunk_is_pythons():
    """The cpp op's own chunk rule (``chunk_size=0``, for callers of ``torch.ops.myext``)
    is the Python default's: a bfloat16 weight gradient, summed in float32 chunk by
    chunk, comes out with the same bits, and with other bits where the chunks differ
    (3 chunks of 234 rows here, against 335, 335 and 30)."""
    from myext.ops.linear_cross_entropy import default_chunk_size

    torch.manual_seed(0)
    rows, classes = 700, 50000
    x, w, _, target, _ = make_case((rows,), 8, classes, bias=False, dtype=torch.bfloat16)
    chunk = default_chunk_size(rows, classes, torch.bfloat16)
    assert chunk == 234

    def weight_grad(chunk_size):
        # sum reduction, no options; returns (loss, ..., grad_input, grad_weight, grad_bias)
        out = torch.ops.myext.linear_cross_entropy_forward(x, w, None, target, None, None, 2, -100, 0.0, 0.0, 0.0,
                                                           1.0, False, chunk_size, [False, True, False])
        return out[7]

    own = weight_grad(0)
    assert torch.equal(own, weight_grad(chunk))
    assert not torch.equal(own, weight_grad(335))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_shapes(backend, device, reduction):
    """(*, H) with target (*): per-element losses of the batch shape for 'none', the
    same numbers as the flattened rows; and (H) with a 0-d target."""
    x, w, b, target, _ = make_case((2, 3, 4), 5, 7, device=device)
    loss = myext.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, backend=backend)
    flat = myext.linear_cross_entropy(x.reshape(-1, 5), w, target.reshape(-1), linear_bias=b, reduction=reduction,
                                      backend=backend)
    assert loss.shape == ((2, 3, 4) if reduction == "none" else ())
    torch.testing.assert_close(loss.reshape(-1) if reduction == "none" else loss, flat)
    q = torch.softmax(torch.randn(2, 3, 4, 7, dtype=torch.float64, device=device), dim=-1)
    prob_loss = myext.linear_cross_entropy(x, w, q, linear_bias=b, reduction=reduction, backend=backend)
    torch.testing.assert_close(prob_loss, pytorch_linear_cross_entropy(x, w, q, linear_bias=b, reduction=reduction))

    one_x, one_target = x[0, 0, 0], target[0, 0, 0]
    one = myext.linear_cross_entropy(one_x, w, one_target, linear_bias=b, reduction=reduction, backend=backend)
    assert one.shape == ()
    torch.testing.assert_close(one, F.cross_entropy(F.linear(one_x, w, b), one_target))


def test_matches_torch_linear_cross_entropy(backend, device):
    """PyTorch's own op (2.13 on), without options and with its chunked path."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    x, w, b, target, _ = make_case((33,), 8, 21, dtype=torch.float32, device=device, bias=False)
    ours, our_grads = loss_and_grads(myext.linear_cross_entropy, x, w, None, target, backend=backend,
                                     ignore_index=None)
    theirs, their_grads = loss_and_grads(F.linear_cross_entropy, x, w, None, target)
    torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float32])
    for got, want in zip(our_grads, their_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_all_ignored_and_empty_batches(backend, device):
    """As F.cross_entropy: a mean over no kept row is nan (0/0), the sum 0, gradients 0."""
    x, w, b, _, _ = make_case((4,), 3, 5, device=device)
    ignored = torch.full((4,), -100, device=device)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        loss, grads = loss_and_grads(myext.linear_cross_entropy, x, w, b, ignored, reduction=reduction,
                                     backend=backend)
        torch.testing.assert_close(loss, torch.tensor(expect, dtype=torch.float64, device=device), equal_nan=True)
        if reduction == "sum":
            assert all(torch.count_nonzero(g) == 0 for g in grads)
    empty = myext.linear_cross_entropy(x[:0], w, ignored[:0], linear_bias=b, reduction="none", backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_rows_give_zero_gradients(backend, device, dtype, reduction):
    """A batch of no rows (hypothesis found one): the weight's and bias's gradients are
    exactly 0 in every dtype and reduction, whichever way the weight gradient is summed."""
    x = torch.randn(0, 3, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(5, 3, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    loss = myext.linear_cross_entropy(x, w, torch.zeros(0, dtype=torch.long, device=device), linear_bias=b,
                                      reduction=reduction, backend=backend)
    grads = torch.autograd.grad(loss.sum(), (x, w, b))
    assert grads[0].shape == (0, 3)
    assert torch.equal(grads[1], torch.zeros_like(w)) and torch.equal(grads[2], torch.zeros_like(b))


def test_gradients_from_forward_scale_with_the_upstream_gradient(backend, device):
    """For 'mean' and 'sum' forward computes the gradients and backward scales them:
    backward twice (retain_graph) and under an upstream gradient of 3 give the same,
    and the kept gradients are not changed by backward."""
    x, w, b, target, weight = make_case((10,), 6, 9, weighted=True, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = myext.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], weight=weight,
                                      chunk_size=3, backend=backend)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    tripled = torch.autograd.grad(loss, leaves, torch.tensor(3.0, dtype=torch.float64, device=device),
                                  retain_graph=True)
    again = torch.autograd.grad(loss, leaves)
    _, want = loss_and_grads(pytorch_linear_cross_entropy, x, w, b, target, weight=weight)
    for f, t, a, expected in zip(first, tripled, again, want):
        torch.testing.assert_close(f, expected)
        torch.testing.assert_close(t, 3 * expected)
        # The second backward makes the logits again; it gives the first one's bits.
        assert torch.equal(a, f)


def test_vocab_parallel_refuses_forward_ad_and_torch_func():
    x, w, target = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 9, 3])
    shard = myext.distributed.VocabParallel(0, 5, 10)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
            myext.linear_cross_entropy(dual, w, target, vocab_parallel=shard)
    with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
        torch.func.grad(lambda x: myext.linear_cross_entropy(x, w, target, vocab_parallel=shard))(x)


def test_only_the_gradients_asked_for(backend, device):
    """A frozen head (linear_weight without grad) still gives the input's gradient,
    and a frozen input the head's."""
    x, w, b, target, _ = make_case((7,), 4, 6, device=device)
    for wants in ((True, False, False), (False, True, True), (False, False, True)):
        leaves = [t.clone().requires_grad_(want) for t, want in zip((x, w, b), wants)]
        loss = myext.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], backend=backend)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
        _, want = loss_and_grads(pytorch_linear_cross_entropy, x, w, b, target)
        for got, expected in zip(grads, [g for g, wanted in zip(want, wants) if wanted]):
            torch.testing.assert_close(got, expected)


def test_no_grad_gives_the_same_loss(backend, device):
    x, w, b, target, weight = make_case((9,), 5, 8, weighted=True, device=device)
    with torch.no_grad():
        loss = myext.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, label_smoothing=0.2,
                                          backend=backend)
    torch.testing.assert_close(loss, pytorch_linear_cross_entropy(x, w, target, linear_bias=b, weight=weight,
                                                                  label_smoothing=0.2))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extras_match_cross_entropy_of_the_logits(backend, device, reduction):
    x, w, b, target, _ = make_case((3, 5), 6, 9, device=device)
    out = myext.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, softcap=4.0,
                                     return_lse=True, return_accuracy=True, chunk_size=4, backend=backend)
    want = myext.cross_entropy(F.linear(x, w, b).permute(0, 2, 1), target, reduction=reduction, softcap=4.0,
                               return_lse=True, return_accuracy=True, backend="torch")
    assert out.lse.shape == (3, 5)
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.lse, want.lse.reshape(3, 5), equal_nan=True)
    torch.testing.assert_close(out.accuracy, want.accuracy)


@pytest.mark.compiled_backends
def test_compiles_to_one_fused_op_per_pass(backend, device):
    """torch.compile(fullgraph=True) records the fused op as one node: forward holds no
    GEMM of its own, and backward (mean) only scales forward's gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    x, w, b, target, _ = make_case((12,), 6, 10, dtype=torch.float32, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def step(x, w, b):
        return myext.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=5, backend=backend)

    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    forward, backward = graphs
    targets = [str(n.target) for n in forward.graph.nodes if n.op == "call_function"]
    assert sum("linear_cross_entropy_forward" in t for t in targets) == 1, targets
    assert not any("aten.mm" in t or "aten.addmm" in t for t in targets), targets
    backward_targets = [str(n.target) for n in backward.graph.nodes if n.op == "call_function"]
    assert not any("linear_cross_entropy" in t or "aten.mm" in t for t in backward_targets), backward_targets
    _, want = loss_and_grads(pytorch_linear_cross_entropy, x, w, b, target)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


# --- bad arguments -----------------------------------------------------------------

def _bad(**changes):
    return changes


BAD_INPUTS = [
    (_bad(input=lambda x: x.long()), TypeError, "input must have a floating dtype"),
    (_bad(input=lambda x: x.sum()), ValueError, "input must be"),
    (_bad(linear_weight=lambda w: w[:, :3]), ValueError, r"the input's features last, \(C, ..., 4\)"),
    (_bad(linear_weight=lambda w: w[0]), ValueError, r"linear_weight must be \(C, H\) or \(C, d1, ..., dk, H\)"),
    (_bad(linear_weight=lambda w: w.unsqueeze(1)), ValueError, r"linear_bias must have shape \(5, 1\)"),
    (_bad(linear_weight=lambda w: w.unsqueeze(1), linear_bias=lambda b: b.unsqueeze(1)), ValueError,
     r"target of class indices must have shape \(6, 1\)"),
    (_bad(linear_weight=lambda w: w.double()), TypeError, "linear_weight has dtype"),
    (_bad(linear_bias=lambda b: b[:2]), ValueError, r"linear_bias must have shape \(5,\)"),
    (_bad(target=lambda t: t[:2]), ValueError, "target of class indices must have shape"),
    (_bad(target=lambda t: t.int()), TypeError, "target must hold class indices as int64"),
    (_bad(target=lambda t: torch.rand(6, 4)), ValueError, r"probabilities and must have the shape \(\*, C\)"),
    (_bad(target=lambda t: torch.where(t == 1, 9, t)), IndexError, "class index 9"),
    (_bad(weight=lambda w: w[:3]), ValueError, "weight must have one entry per class"),
    (_bad(reduction="avg"), ValueError, "reduction must be one of"),
    (_bad(label_smoothing=1.5), ValueError, "label_smoothing must be a float"),
    (_bad(lse_square_scale=-1.0), ValueError, "lse_square_scale must be"),
    (_bad(softcap=0.0), ValueError, "softcap must be"),
    (_bad(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (_bad(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (_bad(accum_dtype=torch.float16), ValueError, "accum_dtype must be None, torch.float32 or the input's dtype"),
    (_bad(accum_dtype="float32"), ValueError, "accum_dtype must be None"),
    (_bad(return_accuracy=True, target=lambda t: torch.softmax(torch.randn(6, 5), 1)), ValueError,
     "return_accuracy needs class-index targets"),
    (_bad(backend="fortran"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input(backend, device, changes, error, message):
    args = dict(input=torch.randn(6, 4, device=device), linear_weight=torch.randn(5, 4, device=device),
                target=torch.tensor([0, 1, 2, 1, 4, 3], device=device), linear_bias=torch.randn(5, device=device),
                weight=torch.ones(5, device=device), backend=backend)
    for key, change in changes.items():
        args[key] = change(args[key]).to(device) if callable(change) else change
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=message):
        myext.linear_cross_entropy(**args)
    for key, saved in before.items():
        assert torch.equal(args[key], saved)


# Direct calls of the dispatcher ops with arguments the Python layer refuses: each must
# raise, naming the argument, never crash or read out of bounds (conftest.isolated).
DIRECT_SETUP = """
x = torch.randn(6, 4, device=dev)
w = torch.randn(5, 4, device=dev)
b = torch.randn(5, device=dev)
t = torch.tensor([1, 2, 0, 4, 3, 1], device=dev)
loss, row_max, row_log_sum, target_logit, total, row_entropy, *grads = ops.linear_cross_entropy_forward(
    x, w, b, t, None, None, 0, -100, 0.0, 0.0, 0.0, 1.0, False, 0, [False, False, False])
g = torch.ones(6, device=dev)
row_weight, weight_sum = torch.ones(6, device=dev), torch.tensor(9.0, device=dev)
"""
F_ARGS = "x, w, b, t, None, None, 1, -100, 0.0, 0.0, 0.0, 1.0, False, 0, [True, True, True]"
B_ARGS = ("g, x, w, b, t, None, None, row_max, row_log_sum, total, None, None, None, 0, -100, 0.0, 0.0, 0.0, 1.0, "
          "False, 0, [True, True, True]")
# w and b as the rows [2, 7) of an output layer of 9 classes.
S_ARGS = ("g, x, w, b, t, None, None, row_max, row_log_sum, row_weight, total, weight_sum, None, None, None, 0, -100, "
          "0.0, 0.0, 0.0, 1.0, False, 2, 9, 0, [True, True, True]")


def _shard_backward(**replace):
    args = S_ARGS
    for old, new in replace.items():
        args = args.replace(old, new, 1)
    return f"ops.linear_cross_entropy_shard_backward({args})"


def _forward(**replace):
    args = F_ARGS
    for old, new in replace.items():
        args = args.replace(old, new, 1)
    return f"ops.linear_cross_entropy_forward({args})"


BAD_DIRECT_CALLS = {
    "1-d input": (_forward(**{"x,": "x[0],"}), "input"),
    "integer input": (_forward(**{"x,": "x.long(),"}), "input"),
    "weight of other features": (_forward(**{"w,": "w[:, :3],"}), "linear_weight"),
    "weight of another dtype": (_forward(**{"w,": "w.double(),"}), "linear_weight"),
    "3-d weight": (_forward(**{"w,": "w.unsqueeze(1),"}), "linear_weight"),
    "bias shorter than the classes": (_forward(**{"b,": "b[:2],"}), "linear_bias"),
    "target shorter than the rows": (_forward(**{"t,": "t[:2],"}), "target"),
    "class index out of range": (_forward(**{"t,": "torch.tensor([1, 2, 9, 0, 0, 0], device=dev),"}),
                                 "class index"),
    "class weight shorter than the classes": (_forward(**{"None,": "torch.ones(3, device=dev),"}), "weight"),
    "reduction 7": (_forward(**{" 1,": " 7,"}), "reduction"),
    "label_smoothing 2": (_forward(**{"0.0,": "2.0,"}), "label_smoothing"),
    "negative softcap": (_forward(**{"0.0, 1.0,": "-1.0, 1.0,"}), "softcap"),
    "temperature 0": (_forward(**{"1.0, False": "0.0, False"}), "temperature"),
    "infinite temperature": (_forward(**{"1.0, False": "float('inf'), False"}), "temperature"),
    "sample_weight shorter than the rows": (_forward(**{"None, 1,": "torch.ones(2, device=dev), 1,"}),
                                            "sample_weight"),
    "backward grad_entropy without row_entropy": (
        f"ops.linear_cross_entropy_backward({B_ARGS.replace('None, None, None, 0', 'None, g, None, 0')})",
        "row_entropy"),
    "backward grad_logprob shorter than the rows": (
        f"ops.linear_cross_entropy_backward({B_ARGS.replace('None, None, None, 0', 'g[:2], None, None, 0')})",
        "grad_logprob"),
    "shard sample_weight shorter than the rows": (_shard_backward(**{"None, row_max": "g[:4], row_max"}),
                                                  "sample_weight"),
    "negative chunk_size": (_forward(**{" 0, [": " -4, ["}), "chunk_size"),
    "accum_dtype of a narrower dtype": (_forward(**{"True]": "True], torch.float16"}), "accum_dtype"),
    "backward accum_dtype wider than the accumulation's": (
        f"ops.linear_cross_entropy_backward({B_ARGS}, torch.float64)", "accum_dtype"),
    "shard accum_dtype of a narrower dtype": (_shard_backward(**{"True]": "True], torch.bfloat16"}), "accum_dtype"),
    "row_max shorter than the rows": (
        f"ops.linear_cross_entropy_backward({B_ARGS.replace('row_max', 'row_max[:2]')})", "row_max"),
    "grad_loss shorter than the rows": (
        f"ops.linear_cross_entropy_backward({B_ARGS.replace('g, ', 'g[:3], ', 1)})", "grad_loss"),
    "backward weight of other features": (
        f"ops.linear_cross_entropy_backward({B_ARGS.replace(' w,', ' w[:, :3],')})", "linear_weight"),
    "shard past the classes": (_shard_backward(**{" 2, 9,": " 5, 9,"}), "within the 9 classes"),
    "shard with a negative start": (_shard_backward(**{" 2, 9,": " -1, 9,"}), "class_start"),
    "shard row_weight shorter than the rows": (_shard_backward(**{"row_weight,": "row_weight[:2],"}), "row_weight"),
    "shard weight_sum not a scalar": (_shard_backward(**{"weight_sum,": "weight_sum.expand(2),"}), "weight_sum"),
    "shard class index past every class": (
        _shard_backward(**{" t,": " torch.tensor([1, 9, 0, 4, 3, 1], device=dev),"}), "class index"),
    "shard weight of the whole classes": (_shard_backward(**{"None,": "torch.ones(9, device=dev),"}), "weight"),
    "shard bias shorter than its rows": (_shard_backward(**{" b,": " b[:2],"}), "linear_bias"),
    "shard grad_loss shorter than the rows": (_shard_backward(**{"g, ": "g[:3], "}), "grad_loss"),
}


@pytest.mark.compiled_backends
def test_good_direct_shard_call_runs(isolated, backend, device):
    """The set-up's shard call, unchanged, runs: each bad call below differs from it in one argument."""
    if not myext.backends.has_capability(OP, "shard_backward", backend, torch.device(device)):
        pytest.skip(f"{backend} has no shard backward")
    result = isolated(DIRECT_SETUP, _shard_backward(), backend, device)
    assert result["outcome"] == "returned", result


@pytest.mark.compiled_backends
@pytest.mark.parametrize("case", BAD_DIRECT_CALLS)
def test_bad_direct_call_raises(isolated, backend, device, case):
    code, mentions = BAD_DIRECT_CALLS[case]
    if "shard" in case and not myext.backends.has_capability(OP, "shard_backward", backend, torch.device(device)):
        pytest.skip(f"{backend} has no shard backward")
    if case in ("class index out of range", "shard class index past every class") and device == "cuda":
        pytest.skip("on CUDA a device-side assertion, which ends the process's CUDA context (see test_gpu.py)")
    result = isolated(DIRECT_SETUP, code, backend, device)
    assert result["outcome"] == "raised", result
    assert mentions in result["message"], result
