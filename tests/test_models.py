"""myext.models against the seed article's own classes (tests/article.py, verbatim)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import myext
from myext import models
from myext.models import multitask_loss
from myext.nn import FusedLinearReLU

from article import MultiTaskNet, SimpleNet

CPU_BACKENDS = [b for b in myext.available_backends("cpu") if b != "triton"]




PAIRS = [(SimpleNet, models.SimpleNet), (MultiTaskNet, models.MultiTaskNet)]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("article_cls,ours_cls", PAIRS, ids=["SimpleNet", "MultiTaskNet"])
def test_same_layers_and_initial_weights(article_cls, ours_cls):
    torch.manual_seed(1)
    article = article_cls()
    torch.manual_seed(1)
    ours = ours_cls()
    assert isinstance(ours.fc1, FusedLinearReLU)
    assert list(ours.state_dict()) == list(article.state_dict())
    for key, value in article.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("article_cls,ours_cls", PAIRS, ids=["SimpleNet", "MultiTaskNet"])
def test_state_dict_round_trip_and_same_outputs(article_cls, ours_cls, backend):
    article = article_cls()
    ours = ours_cls(backend=backend)
    ours.load_state_dict(article.state_dict())  # strict: same keys and shapes
    x = torch.randn(16, 1, 28, 28)
    for out, ref in zip(as_tuple(ours(x)), as_tuple(article(x))):
        torch.testing.assert_close(out, ref)

    sum(o.square().sum() for o in as_tuple(ours(x))).backward()
    sum(o.square().sum() for o in as_tuple(article(x))).backward()
    for (name, p), p_ref in zip(ours.named_parameters(), article.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)

    # ... and back: a trained state of ours loads into the article's class.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01)
    back = article_cls()
    back.load_state_dict(ours.state_dict())
    for out, ref in zip(as_tuple(back(x)), as_tuple(ours(x))):
        torch.testing.assert_close(out, ref)


def test_multitask_head_sizes():
    net = models.MultiTaskNet(10, 2)
    out1, out2 = net(torch.randn(3, 784))
    assert out1.shape == (3, 10) and out2.shape == (3, 2)
    assert (net.fc2.out_features, net.fc3.out_features) == (10, 2)
    default1, default2 = models.MultiTaskNet()(torch.randn(3, 28, 28))
    assert default1.shape == default2.shape == (3, 10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_reaches_the_fused_layer(backend):
    for net in (models.SimpleNet(backend=backend), models.MultiTaskNet(backend=backend)):
        assert net.fc1.backend == backend
    x = torch.randn(4, 784)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        models.SimpleNet(backend=backend)(x)
    ran_kernel = any(event.name == "myext::linear_relu" for event in prof.events())
    assert ran_kernel == (backend == "cpp")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multitask_loss(backend):
    out1 = torch.randn(8, 10, requires_grad=True)
    out2 = torch.randn(8, 2, requires_grad=True)
    y1, y2 = torch.randint(0, 10, (8,)), torch.randint(0, 2, (8,))
    loss = multitask_loss((out1, out2), (y1, y2), backend=backend)
    expected = F.cross_entropy(out1, y1) + F.cross_entropy(out2, y2)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (out1, out2))
    grads_ref = torch.autograd.grad(expected, (out1, out2))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)

    weighted = multitask_loss((out1, out2), (y1, y2), task_weights=(0.3, 2.0), label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(weighted, 0.3 * F.cross_entropy(out1, y1, label_smoothing=0.1)
                               + 2.0 * F.cross_entropy(out2, y2, label_smoothing=0.1))


def test_multitask_loss_bad_arguments():
    out, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="one target per output"):
        multitask_loss((out, out), (y,))
    with pytest.raises(ValueError, match="one task weight per output"):
        multitask_loss((out, out), (y, y), task_weights=(1.0,))
    with pytest.raises(ValueError, match="at least one output"):
        multitask_loss((), ())


def test_one_corrected_training_step_matches_the_article_model():
    """The article's loop, corrected (optimizer from an instance, loss against labels),
    moves ours and the article's model alike."""
    torch.manual_seed(0)
    article = SimpleNet()
    ours = models.SimpleNet()
    ours.load_state_dict(article.state_dict())
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for net, criterion in ((article, nn.CrossEntropyLoss()), (ours, myext.nn.CrossEntropyLoss())):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            criterion(net(x), y).backward()
            optimizer.step()
    for key, value in article.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ours_cls", [models.SimpleNet, models.MultiTaskNet], ids=["SimpleNet", "MultiTaskNet"])
def test_fused_loss_matches_logits_then_loss(ours_cls, backend):
    """model.loss runs each head fused with its loss: the same loss and parameter
    gradients as cross-entropy of forward's logits (the article's summed loss for two heads)."""
    torch.manual_seed(0)
    net = ours_cls(backend=backend)
    x = torch.randn(16, 1, 28, 28)
    y1, y2 = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    if ours_cls is models.SimpleNet:
        fused, unfused = net.loss(x, y1), F.cross_entropy(net(x), y1)
    else:
        out1, out2 = net(x)
        fused, unfused = net.loss(x, y1, y2), F.cross_entropy(out1, y1) + F.cross_entropy(out2, y2)
    torch.testing.assert_close(fused, unfused)
    params = list(net.parameters())
    for g, g_ref in zip(torch.autograd.grad(fused, params), torch.autograd.grad(unfused, params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
