"""torch.compile(backend="myext"): the rewrite of dynamo's graphs, on the article's
networks, a model symbolic tracing rejects, a GPT-style LM in plain PyTorch and
Hugging Face causal LMs; in float64, against the same models run eagerly.

Most cases compile the rewritten graph with ``aot_eager`` (what the rewrite does is the
subject, and AOTAutograd traces the fused ops' forward and backward as Inductor's
would); a few go through Inductor, the default, end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import myext
import myext.compiler
from article import MultiTaskNet, SimpleNet

AOT = {"compiler": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    myext.compiler.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, options=AOT, **kwargs):
    return torch.compile(fn, backend="myext", options=options, **kwargs)


def fusions():
    return [str(f) for report in myext.compiler.reports() for f in report.fusions]


def left():
    return [why for report in myext.compiler.reports() for why in report.left]


def assert_same_step(model, step, *inputs, rtol=1e-10, atol=1e-12, options=AOT):
    """step(model, *inputs) compiled with the backend and run eagerly on a copy of the
    model: the same loss, and the same gradient of every parameter."""
    reference = copy.deepcopy(model)
    loss = compiled(lambda *a: step(model, *a), options)(*inputs)
    expected = step(reference, *inputs)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, [p for p in reference.parameters() if p.requires_grad])
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def classify(model, x, y):
    return F.cross_entropy(model(x), y)


def test_registered_by_name():
    """The name resolves: through torch's entry point once installed, else (a source tree
    on PYTHONPATH) from the import of myext.compiler."""
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "myext" in list_backends(exclude_tags=())
    assert lookup_backend("myext") is myext.compiler.backend


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_article_simplenet(compiler):
    model = SimpleNet().double()
    x, y = torch.randn(16, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (16,))
    assert_same_step(model, classify, x, y, options={"compiler": compiler})
    assert fusions() == ["fc1 (nn.Linear) + torch.relu -> myext.linear_relu",
                         "fc2 (nn.Linear) + cross_entropy (F.cross_entropy) -> myext.linear_cross_entropy"]


def test_article_multitasknet():
    def two_losses(model, x, y1, y2):
        out1, out2 = model(x)
        return F.cross_entropy(out1, y1) + 0.5 * F.cross_entropy(out2, y2, label_smoothing=0.1)

    model = MultiTaskNet().double()
    x = torch.randn(16, 784, dtype=torch.float64)
    assert_same_step(model, two_losses, x, torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,)))
    assert [f.split(" ")[0] for f in fusions()] == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize("use,why", [("returned", "the logits leave the graph (returned, or used past a graph "
                                                  "break)"),
                                      ("metric", "the logits are used by argmax, cross_entropy")])
def test_logits_used_elsewhere_are_left_with_the_reason(use, why):
    """Logits the model also returns, or that a metric reads, must be made: the Linear and
    the loss stay as written."""
    model = SimpleNet().double()

    def loss_and_more(x, y):
        logits = model(x)
        more = logits if use == "returned" else (logits.argmax(1) == y).float().mean()
        return F.cross_entropy(logits, y), more

    x, y = torch.randn(4, 784, dtype=torch.float64), torch.randint(0, 10, (4,))
    loss, more = compiled(loss_and_more)(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert fusions() == ["fc1 (nn.Linear) + torch.relu -> myext.linear_relu"]
    assert left() == [f"fc2 (nn.Linear) + cross_entropy: {why}, not only by a cross-entropy"
                      if use == "metric" else f"fc2 (nn.Linear) + cross_entropy: {why}"]


class DataDependent(nn.Module):
    """A branch on a tensor's value: symbolic tracing fails, dynamo breaks the graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 7)

    def forward(self, x, y):
        h = F.relu(self.fc1(x))
        if h.sum() > 0:
            h = self.fc2(h).relu()
        return F.cross_entropy(self.head(h), y, reduction="sum")


def test_data_dependent_control_flow():
    model = DataDependent().double()
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 7, (10,))
    with pytest.raises(myext.fuse.__globals__["FuseTraceError"]):
        myext.fuse(model)
    assert_same_step(model, lambda m, x, y: m(x, y), x, y)
    assert len(myext.compiler.reports()) >= 2  # the graph broke at the branch
    assert sorted(f.split(" ")[0] for f in fusions()) == ["fc1", "fc2", "head"]


class TinyGPT(nn.Module):
    """A GPT-style LM in plain PyTorch: embeddings, pre-norm blocks (causal attention, an
    MLP with a ReLU), a soft cap on the logits and the causal loss over shifted labels."""

    def __init__(self, vocab=97, hidden=32, layers=2, heads=4, softcap=None, tied=False):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(64, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(hidden), qkv=nn.Linear(hidden, 3 * hidden), proj=nn.Linear(hidden, hidden),
            norm2=nn.LayerNorm(hidden), up=nn.Linear(hidden, 4 * hidden), down=nn.Linear(4 * hidden, hidden),
        )) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.heads, self.vocab, self.softcap = heads, vocab, softcap

    def hidden_states(self, idx):
        B, T = idx.shape
        h = self.embed(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + block["proj"](attention.transpose(1, 2).reshape(B, T, -1))
            h = h + block["down"](F.relu(block["up"](block["norm2"](h))))
        return self.norm(h)

    def forward(self, idx, labels):
        logits = self.lm_head(self.hidden_states(idx))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.float()
        loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, self.vocab), labels[..., 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss / (labels[..., 1:] != -100).sum()


def lm_batch(vocab=97, B=2, T=12):
    idx = torch.randint(0, vocab, (B, T))
    labels = idx.clone()
    labels[1, -4:] = -100
    return idx, labels


@pytest.mark.parametrize("softcap,tied", [(None, False), (3.0, True)])
def test_gpt_style_lm(softcap, tied):
    """The head fuses through the soft cap, the upcast, the shift by slicing and the view,
    with ignore_index and a 'sum' divided by the count; every MLP's Linear+ReLU fuses."""
    model = TinyGPT(softcap=softcap, tied=tied).double()
    # The model's .float() rounds eager's logits to float32; the fused op computes in
    # float64 and rounds the loss: float32's precision on both sides.
    assert_same_step(model, lambda m, i, l: m(i, l), *lm_batch(), rtol=2e-6, atol=1e-6)
    lm = [f for f in fusions() if f.startswith("lm_head")]
    steps = "truediv -> tanh -> mul -> float" if softcap else "float"
    assert lm == [f"lm_head (nn.Linear) -> {steps} -> getitem -> reshape + loss (F.cross_entropy)"
                  " -> myext.linear_cross_entropy"]
    assert sum(f.startswith("blocks.") and "linear_relu" in f for f in fusions()) == 2


def test_classes_second_logits():
    """cross_entropy(logits.transpose(1, 2), labels) of (B, T, C) logits: (B, T) rows."""
    head = nn.Linear(16, 11).double()

    def loss(model, h, y):
        return F.cross_entropy(model(h).transpose(1, 2), y, reduction="none").mean(0).sum()

    assert_same_step(head, loss, torch.randn(3, 5, 16, dtype=torch.float64), torch.randint(0, 11, (3, 5)))
    assert len(fusions()) == 1 and "transpose" in fusions()[0]


@pytest.mark.parametrize("why,body", [
    ("an index into the classes' dimension", lambda z: z[:, :5]),
    ("a transpose or permute", lambda z: z.t()),
    ("view to a shape whose last dimension is not the classes'", lambda z: z.view(-1)),
])
def test_steps_that_do_not_commute_are_left(why, body):
    head = nn.Linear(6, 5).double()
    x = torch.randn(5, 6, dtype=torch.float64)

    def loss(model, x):
        z = body(model(x))
        return F.cross_entropy(z.reshape(5, -1), torch.zeros(5, dtype=torch.long)) if z.dim() < 2 else \
            F.cross_entropy(z, torch.zeros(z.shape[0], dtype=torch.long))

    assert_same_step(head, loss, x)
    assert fusions() == [] and len(left()) == 1 and why in left()[0], left()


def test_unknown_option_is_a_clear_error():
    model = SimpleNet()
    with pytest.raises(Exception, match="Unexpected optimization option no_such_option.*own options"):
        compiled(model, options={"no_such_option": True})(torch.randn(2, 784))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="option 'compiler' must be one of"):
        compiled(model, options={"compiler": "tvm"})(torch.randn(2, 784))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="are Inductor's"):
        compiled(model, options={"compiler": "eager", "max_autotune": True})(torch.randn(2, 784))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="option 'accum_dtype' must be a torch.dtype"):
        compiled(model, options={**AOT, "accum_dtype": "bfloat16"})(torch.randn(2, 784))


def test_explain_reports_without_compiling():
    model = SimpleNet()
    reports = myext.compiler.explain(model, torch.randn(2, 784))
    assert [str(f) for r in reports for f in r.fusions] == ["fc1 (nn.Linear) + torch.relu -> myext.linear_relu"]


def test_kernels_option_picks_the_backend():
    model = SimpleNet().double()
    x, y = torch.randn(8, 784, dtype=torch.float64), torch.randint(0, 10, (8,))
    assert_same_step(model, classify, x, y, options={**AOT, "kernels": "torch"})


def test_accum_dtype_option_reaches_the_head():
    """The fused head takes the backend's accum_dtype: the model's own dtype runs as the
    default does, and one the op refuses for it is refused."""
    model = SimpleNet().double()
    x, y = torch.randn(8, 784, dtype=torch.float64), torch.randint(0, 10, (8,))
    assert_same_step(model, classify, x, y, options={**AOT, "accum_dtype": torch.float64})
    assert any(f.endswith("myext.linear_cross_entropy") for f in fusions()), fusions()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="accum_dtype must be None, torch.float64 or the input's dtype"):
        compiled(lambda *a: classify(model, *a), {**AOT, "accum_dtype": torch.float16})(x, y)


# --------------------------------------------------------------------------- Hugging Face causal LMs

@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_hugging_face_causal_lm(name):
    """The unpatched model's loss, compiled: the head and its loss fuse through the model's
    own loss function (upcast, shift by padding the labels, view), soft cap included."""
    hf_models = pytest.importorskip("hf_models")
    model = hf_models.tiny_causal_lm(name)
    batch = hf_models.batch()
    if name == "gpt2":
        # GPT2LMHeadModel has no loss_type: transformers warns when it picks the causal
        # loss, and dynamo breaks the graph at that warning, between the head and its loss,
        # where nothing can fuse them (the report says so). Naming the loss mends it.
        assert_same_step(model, lambda m, b: m(**b).loss, batch, rtol=2e-6, atol=1e-6)
        assert any(why.startswith("lm_head (nn.Linear): the logits leave the graph") for why in left()), left()
        torch._dynamo.reset()
        myext.compiler.reset()
        model.loss_type = "ForCausalLM"
    assert_same_step(model, lambda m, b: m(**b).loss, batch, rtol=2e-6, atol=1e-6)
    head = [f for f in fusions() if f.startswith("lm_head")]
    # (dynamo may compile the model's graph more than once)
    assert len(set(head)) == 1 and head[0].endswith("-> myext.linear_cross_entropy"), fusions()
    if name == "gemma2":
        assert "truediv -> tanh -> mul" in head[0]
