"""myext.fuse: torch.fx rewriting of Linear+ReLU pairs and cross-entropies."""

import copy
import io
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import myext
from myext._patterns import linear_cross_entropy_chain
from myext.fuse import FuseTraceError
from myext.nn import CrossEntropyLoss, FusedLinearReLU
from article import MultiTaskNet, SimpleNet  # the article's classes, verbatim


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_same_function(original, fused, *inputs):
    """Same outputs, and the same parameter gradients of a loss on them: the fused
    model's within twice the original's own float32 error, against the original in
    float64 (an element-wise tolerance fails on gradients near zero in a tensor whose
    largest are hundreds, where one rounding of those is above it)."""
    outs, outs_fused = as_tuple(original(*inputs)), as_tuple(fused(*inputs))
    for o, o_fused in zip(outs, outs_fused):
        torch.testing.assert_close(o_fused, o)
    grads = grads_of(original, sum(o.square().sum() for o in outs))
    grads_fused = grads_of(original, sum(o.square().sum() for o in outs_fused))  # shared parameters
    exact = copy.deepcopy(original).double()
    outs_exact = as_tuple(exact(*[i.double() if i.is_floating_point() else i for i in inputs]))
    grads_exact = grads_of(exact, sum(o.square().sum() for o in outs_exact))
    for g, g_fused, g_exact in zip(grads, grads_fused, grads_exact):
        own_error = (g.double() - g_exact).abs().max().item()
        error = (g_fused.double() - g_exact).abs().max().item()
        assert error <= 2 * own_error + 1e-6 * g_exact.abs().max().item(), (error, own_error)


def ops_in(gm):
    return [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def test_article_simplenet():
    model = SimpleNet()
    fused = myext.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    assert [str(f) for f in fused.myext_fusions] == ["fc1 (nn.Linear) + torch.relu -> fc1 (myext.nn.FusedLinearReLU)"]
    assert isinstance(fused.fc1, FusedLinearReLU) and type(fused.fc2) is nn.Linear
    assert type(model.fc1) is nn.Linear  # the original model is left as it was
    assert torch.relu not in [target for _, target in ops_in(fused)]
    assert_same_function(model, fused, torch.randn(8, 1, 28, 28))


def test_article_multitasknet():
    model = MultiTaskNet()
    fused = myext.fuse(model)
    assert len(fused.myext_fusions) == 1 and isinstance(fused.fc1, FusedLinearReLU)
    assert_same_function(model, fused, torch.randn(8, 784))


def test_parameters_are_shared_and_state_dict_keys_kept():
    model = SimpleNet()
    fused = myext.fuse(model)
    assert fused.fc1.weight is model.fc1.weight and fused.fc2.bias is model.fc2.bias
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(SimpleNet().state_dict())  # loading into the fused model updates the original
    assert torch.equal(model.fc1.weight, fused.fc1.weight)


def test_backend_and_training_mode():
    model = SimpleNet().eval()
    fused = myext.fuse(model, backend="torch")
    assert fused.fc1.backend == "torch" and not fused.training and not fused.fc1.training


RELUS = {
    "nn.ReLU": lambda m, h: m.relu(h),
    "nn.ReLU(inplace)": lambda m, h: m.relu_inplace(h),
    "F.relu": lambda m, h: F.relu(h),
    "F.relu(inplace)": lambda m, h: F.relu(h, inplace=True),
    "F.relu_": lambda m, h: F.relu_(h),
    "torch.relu": lambda m, h: torch.relu(h),
    "torch.relu_": lambda m, h: torch.relu_(h),
    "Tensor.relu": lambda m, h: h.relu(),
    "Tensor.relu_": lambda m, h: h.relu_(),
}


class TwoLayers(nn.Module):
    def __init__(self, relu, bias=True):
        super().__init__()
        self.fc = nn.Linear(6, 5, bias=bias)
        self.head = nn.Linear(5, 3)
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.apply_relu = relu

    def forward(self, x):
        return self.head(self.apply_relu(self, self.fc(x)))


@pytest.mark.parametrize("relu", RELUS.values(), ids=RELUS.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_relu_spelling(relu, bias):
    model = TwoLayers(relu, bias)
    fused = myext.fuse(model)
    assert len(fused.myext_fusions) == 1 and isinstance(fused.fc, FusedLinearReLU)
    assert [op for op, _ in ops_in(fused)] == ["call_module", "call_module"]  # fc, head: no ReLU left
    assert not hasattr(fused, "relu") and not hasattr(fused, "relu_inplace")
    assert_same_function(model, fused, torch.randn(4, 6))


def test_functional_linear():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(5))

        def forward(self, x):
            return F.relu(F.linear(x, self.w, self.b)).sum(-1)

    model = Functional()
    fused = myext.fuse(model, backend="cpp")
    assert [str(f) for f in fused.myext_fusions] == ["linear (F.linear) + F.relu -> myext.linear_relu"]
    node = next(n for n in fused.graph.nodes if n.target is myext.linear_relu)
    assert node.kwargs == {"backend": "cpp"}
    assert_same_function(model, fused, torch.randn(4, 6))


def test_sequential_and_nested_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True))

        def forward(self, x):
            return self.layers(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.block(x))

    model = Net()
    fused = myext.fuse(model)
    assert len(fused.myext_fusions) == 2
    assert isinstance(fused.get_submodule("block.layers.0"), FusedLinearReLU)
    assert isinstance(fused.get_submodule("block.layers.2"), FusedLinearReLU)
    assert type(model.block.layers[0]) is nn.Linear and isinstance(model.block.layers[1], nn.ReLU)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_function(model, fused, torch.randn(4, 6))


def test_linear_output_used_elsewhere_is_left_alone():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            h = self.fc(x)
            return torch.relu(h) + h

    model = Residual()
    with pytest.warns(UserWarning, match="nothing to fuse in Residual"):
        fused = myext.fuse(model)
    assert fused.myext_fusions == [] and type(fused.fc) is nn.Linear
    assert len(fused.myext_skipped) == 1 and "also used without the ReLU" in fused.myext_skipped[0]
    assert_same_function(model, fused, torch.randn(3, 5))


def test_module_called_fused_and_unfused_keeps_the_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))  # second call has no ReLU

    model = Shared()
    fused = myext.fuse(model)
    assert type(fused.fc) is nn.Linear
    assert [str(f) for f in fused.myext_fusions] == ["fc (nn.Linear) + torch.relu -> myext.linear_relu"]
    assert_same_function(model, fused, torch.randn(3, 5))


def test_cross_entropy_module_and_function():
    weight = torch.rand(4) + 0.5

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)

        def forward(self, x, y):
            logits = self.fc(x)
            return self.criterion(logits, y) + F.cross_entropy(logits, y, ignore_index=0, reduction="sum")

    model = WithLoss()
    fused = myext.fuse(model, backend="cpp")
    kinds = sorted(str(f) for f in fused.myext_fusions)
    assert kinds == ["criterion (nn.CrossEntropyLoss) -> criterion (myext.nn.CrossEntropyLoss)",
                     "cross_entropy (F.cross_entropy) -> myext.cross_entropy"]
    assert isinstance(fused.criterion, CrossEntropyLoss) and fused.criterion.weight is model.criterion.weight
    assert fused.criterion.backend == "cpp" and fused.criterion.label_smoothing == 0.1
    assert F.cross_entropy not in [target for _, target in ops_in(fused)]
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    assert_same_function(model, fused, x, y)


class ClassifierWithLoss(nn.Module):
    """The article's SimpleNet followed by its training loss, in one forward."""

    def __init__(self, criterion):
        super().__init__()
        self.net = SimpleNet()
        self.criterion = criterion

    def forward(self, x, y):
        return self.criterion(self.net(x), y)


@pytest.mark.parametrize("criterion", ["module", "weighted module", "function"])
def test_linear_into_cross_entropy_becomes_one_fused_op(criterion):
    weight = torch.rand(10) + 0.5
    if criterion == "function":
        class Loss(nn.Module):
            def forward(self, logits, y):
                return F.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum")
        model = ClassifierWithLoss(Loss())
    else:
        model = ClassifierWithLoss(nn.CrossEntropyLoss(weight=weight if criterion == "weighted module" else None,
                                                       ignore_index=3))
    keys = list(model.state_dict())
    fused = myext.fuse(model, backend="cpp")
    loss_name = "cross_entropy (F.cross_entropy)" if criterion == "function" else "criterion (nn.CrossEntropyLoss)"
    assert sorted(str(f) for f in fused.myext_fusions) == sorted([
        "net.fc1 (nn.Linear) + torch.relu -> net.fc1 (myext.nn.FusedLinearReLU)",
        f"net.fc2 (nn.Linear) + {loss_name} -> myext.linear_cross_entropy"])
    assert [target for _, target in ops_in(fused)][-1] is linear_cross_entropy_chain
    assert list(fused.state_dict()) == keys
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    assert_same_function(model, fused, x, y)


def test_linear_output_also_used_elsewhere_keeps_its_cross_entropy_unfused():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x, y):
            logits = self.fc(x)
            return F.cross_entropy(logits, y), logits

    fused = myext.fuse(Both())
    assert [f.kind for f in fused.myext_fusions] == ["cross_entropy"]


def test_linear_cross_entropy_of_more_dimensions_keeps_pytorch_meaning():
    """F.cross_entropy reads (N, d, C) logits with the classes second: the rewrite runs
    the two steps there, as the original model."""
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x, y):
            return F.cross_entropy(self.fc(x), y)

    model = Spatial()
    fused = myext.fuse(model)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
    assert_same_function(model, fused, x, y)


def test_cross_entropy_with_deprecated_arguments_is_left_to_torch():
    class Legacy(nn.Module):
        def forward(self, x, y):
            return F.cross_entropy(x, y, reduce=False)

    with pytest.warns(UserWarning, match="nothing to fuse"):
        fused = myext.fuse(Legacy())
    assert F.cross_entropy in [target for _, target in ops_in(fused)]


def test_models_built_from_myext_modules_trace_and_stay():
    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = myext.models.SimpleNet()
            self.criterion = CrossEntropyLoss()

        def forward(self, x, y):
            return self.criterion(self.net(x), y)

    model = Ours()
    with pytest.warns(UserWarning, match="nothing to fuse in Ours"):
        fused = myext.fuse(model)
    assert fused.net.fc1 is model.net.fc1 and fused.criterion is model.criterion
    x, y = torch.randn(2, 784), torch.randint(0, 10, (2,))
    torch.testing.assert_close(fused(x, y), model(x, y))


def test_untraceable_model_gives_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return torch.relu(self.fc(x))
            return x

    with pytest.raises(FuseTraceError, match="could not trace DataDependent") as info:
        myext.fuse(DataDependent())
    assert isinstance(info.value, fx.proxy.TraceError)
    assert isinstance(info.value.__cause__, fx.proxy.TraceError)
    assert "concrete_args" in str(info.value)


def test_concrete_args():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, activate=True):
            h = self.fc(x)
            return torch.relu(h) if activate else h

    model = Branchy()
    fused = myext.fuse(model, concrete_args={"activate": True})
    assert len(fused.myext_fusions) == 1
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_summary_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="myext.fuse"):
        myext.fuse(SimpleNet())
    assert "fc1 (nn.Linear) + torch.relu -> fc1 (myext.nn.FusedLinearReLU)" in caplog.text


def test_fused_model_saves_and_loads():
    model = MultiTaskNet()
    fused = myext.fuse(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 784)
    for out, ref in zip(loaded(x), model(x)):
        torch.testing.assert_close(out, ref)
    assert [str(f) for f in loaded.myext_fusions] == [str(f) for f in fused.myext_fusions]


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        myext.fuse(lambda x: x)


class CausalHead(nn.Module):
    """A language model's head as symbolic tracing sees it: the logits cast, shifted and
    flattened on their way to the loss."""

    def __init__(self, softcap=None):
        super().__init__()
        self.lm_head = nn.Linear(16, 23, bias=False)
        self.softcap = softcap

    def forward(self, hidden, labels):
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.float()
        return F.cross_entropy(logits[..., :-1, :].reshape(-1, 23), labels[..., 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_linear_through_a_causal_shift_into_cross_entropy(softcap):
    """The steps between a head and its loss, as the compile backend follows them (the
    patterns are shared): the fused op replays the slice and view on the hidden states."""
    model = CausalHead(softcap).double()
    fused = myext.fuse(model)
    steps = "truediv -> tanh -> mul -> float" if softcap else "float"
    assert [str(f) for f in fused.myext_fusions] == [
        f"lm_head (nn.Linear) -> {steps} -> getitem -> reshape + cross_entropy (F.cross_entropy)"
        " -> myext.linear_cross_entropy"]
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 23, (3, 7))
    labels[0, 2] = -100
    loss, expected = fused(hidden, labels), model(hidden, labels)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    (grad,), (expected_grad,) = torch.autograd.grad(loss, hidden), torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
