"""What a language model's training loop asks of its loss, on every backend of both
losses: per-token weights, the exact normalizer, shift, temperature, and each token's
log-probability and entropy from the same pass, against the plain-PyTorch reference
(float64), with gradcheck and gradgradcheck through every output, and bad values refused.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import myext
from myext.ops import cross_entropy as ce_op
from myext.ops import linear_cross_entropy as lce_op

# Tests taking backend and device run on every backend of the fused head (conftest.py);
# cross_entropy has the same backends.
OP = "linear_cross_entropy"
B, T, H, C = 2, 6, 5, 7


def make_lm(*, dtype=torch.float64, device="cpu", ignored=True):
    """Hidden states (B, T, H), a head (C, H) and bias, token ids (B, T) with one
    ignored, and per-token weights (B, T)."""
    x = torch.randn(B, T, H, dtype=dtype, device=device)
    w = (torch.randn(C, H, dtype=dtype, device=device) * 0.8)
    b = torch.randn(C, dtype=dtype, device=device)
    t = torch.randint(0, C, (B, T), device=device)
    if ignored:
        t[0, 3] = -100
    s = torch.rand(B, T, dtype=dtype, device=device) + 0.25
    return x, w, b, t, s


def _both(backend):
    """The two losses as functions of (hidden, head, bias, target, **options): the fused
    head, and cross_entropy of the logits made here (class dimension last, as a causal
    LM's, seen as (N, C, d) by moving it)."""
    def fused(x, w, b, t, **kw):
        return myext.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend, chunk_size=4, **kw)

    def logits(x, w, b, t, **kw):
        return myext.cross_entropy((x @ w.T + b).transpose(1, 2), t, backend=backend, **kw)

    return {"linear_cross_entropy": fused, "cross_entropy": logits}


def _reference(x, w, b, t, **kw):
    return lce_op.reference(x, w, t, linear_bias=b, **kw)


CASES = {
    "sample weights, mean": dict(reduction="mean", weighted=True),
    "sample weights, sum, smoothing": dict(reduction="sum", weighted=True, label_smoothing=0.2),
    "sample weights, none, z-loss": dict(reduction="none", weighted=True, lse_square_scale=0.1),
    "temperature": dict(temperature=0.6),
    "temperature over a soft cap": dict(temperature=2.5, softcap=1.5, label_smoothing=0.1),
    "shift": dict(shift=1),
    "shift 2, none": dict(shift=2, reduction="none", weighted=True),
    "normalizer": dict(normalizer=7.0),
    "normalizer tensor, weights, shift, temperature": dict(normalizer="tensor", weighted=True, shift=1,
                                                          temperature=1.3, softcap=4.0),
}


def _options(case, s, device):
    kw = dict(CASES[case])
    if kw.pop("weighted", False):
        kw["sample_weight"] = s
    if kw.get("normalizer") == "tensor":
        kw["normalizer"] = torch.tensor(9, device=device)
    return kw


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("case", CASES)
def test_options_match_the_reference(backend, device, loss, case):
    """Loss and the gradients of hidden states, head and bias, against the reference of
    the logits held whole (float64)."""
    x, w, b, t, s = make_lm(device=device)
    kw = _options(case, s, device)
    fn = _both(backend)[loss]
    got_leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    want_leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    got = fn(*got_leaves, t, **kw)
    want = _reference(*want_leaves, t, **kw)
    torch.testing.assert_close(got, want)
    upstream = torch.rand_like(want)
    got_grads = torch.autograd.grad(got, got_leaves, upstream)
    want_grads = torch.autograd.grad(want, want_leaves, upstream)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "cross_entropy"])
def test_logprob_and_entropy_are_pytorchs(backend, device, loss):
    """Each position's log-probability of its target and entropy, from the same call as
    the loss, against log_softmax of the logits; 0 where the target is ignored; cut to
    the positions a shift keeps."""
    x, w, b, t, _ = make_lm(device=device)
    out = _both(backend)[loss](x, w, b, t, shift=1, temperature=0.7, return_logprob=True, return_entropy=True,
                               return_lse=True)
    logp = torch.log_softmax((x @ w.T + b)[:, :-1] / 0.7, dim=-1)
    labels = t[:, 1:]
    kept = labels != -100
    want_logprob = torch.where(kept, logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    want_entropy = torch.where(kept, -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(out.logprob, want_logprob)
    torch.testing.assert_close(out.entropy, want_entropy)
    assert out.lse.shape == labels.shape


def test_entropy_of_a_row_without_a_softmax_is_nan(backend, device):
    """A row of -inf logits, or with a +inf or NaN one, has no softmax: its entropy is
    NaN on every backend and in the reference (the kernels' and PyTorch's answer), and
    a finite row's is not touched."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf] * 5, [0.0, inf, 1.0, 2.0, 3.0], [0.0, nan, 1.0, 2.0, 3.0], [0.0, -inf, 1.0, 2.0, 3.0]],
                     dtype=torch.float64, device=device)
    out = myext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device), reduction="none", return_entropy=True,
                              backend=backend)
    assert out.entropy[:3].isnan().all()
    finite = x[3, [0, 2, 3, 4]]
    want = -(torch.softmax(finite, 0) * torch.log_softmax(finite, 0)).sum()
    torch.testing.assert_close(out.entropy[3], want)


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_through_every_output(backend, device, loss, reduction):
    """gradcheck and gradgradcheck (float64) of a PPO-like objective: the loss, the
    log-probabilities and the entropies together, with per-token weights, temperature,
    a soft cap and a shift; the weights themselves differentiated too."""
    x, w, b, t, s = make_lm(device=device)
    x, w, b = x[:, :4], w, b  # small: gradgradcheck makes the logits' Hessian-vector products
    t, s = t[:, :4], s[:, :4]
    fn = _both(backend)[loss]
    coef = torch.rand(B, 3, dtype=torch.float64, device=device)

    def objective(x, w, b, s):
        out = fn(x, w, b, t, sample_weight=s, shift=1, temperature=1.4, softcap=3.0, reduction=reduction,
                 return_logprob=True, return_entropy=True)
        loss_term = out.loss.sum() if reduction == "mean" else (out.loss * coef).sum()
        return loss_term + (out.logprob * coef).sum() - 0.3 * (out.entropy * coef).sum()

    inputs = [a.clone().requires_grad_() for a in (x, w, b, s)]
    # The interpreted Triton kernels take gradcheck's fast mode (a random projection of
    # the Jacobian), as in tests/test_ops.py: the full one costs them half a minute here.
    fast = backend == "triton"
    assert gradcheck(objective, inputs, fast_mode=fast)
    assert gradgradcheck(objective, inputs, fast_mode=fast)


def test_micro_batches_with_the_normalizer_add_up_to_the_batch(backend, device):
    """Gradient accumulation: each micro-batch divides by the whole batch's count of
    tokens, and the micro-batches' gradients add up to the full batch's (the README's
    example)."""
    x, w, b, t, s = make_lm(device=device)
    head = w.clone().requires_grad_()
    full = myext.linear_cross_entropy(x, head, t, linear_bias=b, shift=1, sample_weight=s, backend=backend)
    (want,) = torch.autograd.grad(full, head)
    count = (s[:, 1:] * (t[:, 1:] != -100)).sum()  # the divisor of the whole batch
    for i in range(B):
        part = myext.linear_cross_entropy(x[i:i + 1], head, t[i:i + 1], linear_bias=b, shift=1,
                                          sample_weight=s[i:i + 1], normalizer=count, backend=backend)
        part.backward()
    torch.testing.assert_close(head.grad, want)


def test_sample_weights_gradient_is_the_rows_loss(backend, device):
    """With reduction 'sum' the gradient of each weight is its position's loss."""
    x, w, b, t, s = make_lm(device=device)
    s = s.clone().requires_grad_()
    loss = myext.linear_cross_entropy(x, w, t, linear_bias=b, sample_weight=s, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    rows = myext.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", backend=backend)
    torch.testing.assert_close(grad, rows)


def test_shift_reads_the_hidden_states_where_they_are(backend, device):
    """shift=1 scores position t against token t + 1 with no copy of the hidden states:
    the same as slicing them, which copies."""
    x, w, b, t, _ = make_lm(device=device)
    got = myext.linear_cross_entropy(x, w, t, linear_bias=b, shift=1, backend=backend)
    want = myext.linear_cross_entropy(x[:, :-1].contiguous(), w, t[:, 1:].contiguous(), linear_bias=b,
                                      backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_with_every_option(backend, device, dtype):
    """float32 and bfloat16 with every option on, within PyTorch's own error of the
    float64 truth (twice it, and a floor for bfloat16's rounding of the loss)."""
    x, w, b, t, s = make_lm(device=device)
    kw = dict(sample_weight=s, shift=1, temperature=0.8, softcap=5.0, normalizer=torch.tensor(8.0, device=device))
    truth = _reference(x, w, b, t, **kw)
    low = [a.to(dtype) for a in (x, w, b)]
    got = myext.linear_cross_entropy(low[0], low[1], t, linear_bias=low[2], backend=backend,
                                     **{**kw, "sample_weight": s.to(dtype)})
    pytorch = _reference(*low, t, **{**kw, "sample_weight": s.to(dtype)})
    bound = 2 * (pytorch.double() - truth).abs().item() + (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert (got.double() - truth).abs().item() <= bound


BAD = {
    "sample_weight of another shape": (dict(sample_weight=torch.ones(B, T - 1)), ValueError, "sample_weight"),
    "integer sample_weight": (dict(sample_weight=torch.ones(B, T, dtype=torch.long)), TypeError, "sample_weight"),
    "temperature 0": (dict(temperature=0.0), ValueError, "temperature"),
    "negative temperature": (dict(temperature=-1.0), ValueError, "temperature"),
    "nan temperature": (dict(temperature=float("nan")), ValueError, "temperature"),
    "shift beyond the sequence": (dict(shift=T), ValueError, "shift"),
    "negative shift": (dict(shift=-1), ValueError, "shift"),
    "normalizer with reduction sum": (dict(normalizer=3.0, reduction="sum"), ValueError, "normalizer"),
    "normalizer of a shape": (dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    "normalizer on another device": (dict(normalizer=torch.tensor(3.0, device="meta")), ValueError, "normalizer"),
    "zero normalizer": (dict(normalizer=0), ValueError, "normalizer"),
}


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("case", BAD)
def test_bad_options_are_refused(loss, case):
    options, error, mentions = BAD[case]
    x, w, b, t, _ = make_lm()
    with pytest.raises(error, match=mentions):
        _both("torch")[loss](x, w, b, t, **options)


def test_options_that_do_not_apply_are_refused():
    x, w, b, t, _ = make_lm()
    q = torch.softmax(torch.randn(B, T, C, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match="shift applies to class-index targets"):
        myext.linear_cross_entropy(x, w, q, shift=1)
    with pytest.raises(ValueError, match="return_logprob needs class-index targets"):
        myext.linear_cross_entropy(x, w, q, return_logprob=True)
    with pytest.raises(ValueError, match="shift must be in"):
        myext.cross_entropy(torch.randn(C), torch.tensor(1), shift=1)


def test_modules_take_the_options():
    x, w, b, t, s = make_lm()
    module = myext.nn.LinearCrossEntropyLoss(H, C, bias=True, shift=1, temperature=0.9, dtype=torch.float64)
    with torch.no_grad():
        module.linear.weight.copy_(w)
        module.linear.bias.copy_(b)
    got = module(x, t, sample_weight=s)
    torch.testing.assert_close(got, _reference(x, w, b, t, shift=1, temperature=0.9, sample_weight=s))
    assert "shift=1" in repr(module) and "temperature=0.9" in repr(module)
    loss = myext.nn.CrossEntropyLoss(temperature=2.0)
    logits = torch.randn(4, C, dtype=torch.float64)
    torch.testing.assert_close(loss(logits, t[0, :4].clamp(min=0), normalizer=2.0),
                               F.cross_entropy(logits / 2.0, t[0, :4].clamp(min=0), reduction="sum") / 2.0)


def test_extras_under_forward_ad_are_refused():
    x, w, b, t, _ = make_lm()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="return_logprob"):
            myext.linear_cross_entropy(dual, w, t, return_logprob=True)
    assert ce_op is not None
