"""myext.integrations.transformers: Hugging Face causal LMs whose loss is the fused head's.

Each architecture of tests/hf_models.py, fused, against the same model unfused (a deep
copy): the loss and every gradient, the logits without labels, gradient accumulation
with num_items_in_batch, generation, and the models fuse_causal_lm refuses.

Tolerances: the models are float64, but Hugging Face's loss casts the logits to float32
(``logits.float()``): its loss and the logits' gradient are float32 (relative rounding
6e-8 per element), cast back to float64 for the weights' gradients, while the fused loss
is float64 throughout and cast to float32 at the end. Sums over a 97-class vocabulary
and 24 tokens keep the difference well under 1e-6 relative; rtol=1e-5 with atol=1e-6
(the gradients are of order 1e-2) leaves room and still fails on any real error, which
moves the loss or a gradient by far more.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_models import ARCHITECTURES, VOCAB, batch, tiny_causal_lm, transformers

from myext.integrations.transformers import fuse_causal_lm, unfuse_causal_lm

RTOL, ATOL = 1e-5, 1e-6
NAMES = list(ARCHITECTURES)


def pair(name: str, **fuse_kwargs):
    """The architecture's tiny model and a fused deep copy of it."""
    model = tiny_causal_lm(name)
    return model, fuse_causal_lm(copy.deepcopy(model), **fuse_kwargs)


def run(model, inputs: dict, seed: int = 0):
    """Forward and backward from one RNG state (GPT-2's dropout draws the same masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    return out


def assert_same_training(reference, fused, ref_loss, fused_loss):
    assert fused_loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, ref_loss, rtol=RTOL, atol=ATOL)
    fused_params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients(name):
    reference, fused = pair(name)
    inputs = batch()
    ref_out, fused_out = run(reference, inputs), run(fused, inputs)
    assert ref_out.logits.shape == (2, 12, VOCAB)
    assert fused_out.logits is None
    assert_same_training(reference, fused, ref_out.loss, fused_out.loss)
    if reference.config.tie_word_embeddings:  # gpt2, gemma2: the head is the embedding
        ref_emb, fused_emb = reference.get_input_embeddings(), fused.get_input_embeddings()
        assert fused.get_output_embeddings().weight is fused_emb.weight
        torch.testing.assert_close(fused_emb.weight.grad, ref_emb.weight.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_without_labels_and_tuple(name):
    reference, fused = pair(name)
    inputs = batch()
    labels = inputs.pop("labels")
    with torch.no_grad():
        torch.manual_seed(0)
        expected = reference(**inputs).logits
        torch.manual_seed(0)
        got = fused(**inputs).logits
        torch.manual_seed(0)
        ref_tuple = reference(**inputs, labels=labels, return_dict=False)
        torch.manual_seed(0)
        fused_tuple = fused(**inputs, labels=labels, return_dict=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The tuple drops what is None: the model's (loss, logits, cache...) less the logits.
    assert isinstance(fused_tuple, tuple) and len(fused_tuple) == len(ref_tuple) - 1
    torch.testing.assert_close(fused_tuple[0], ref_tuple[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_micro_batches_with_num_items_in_batch(name):
    reference, fused = pair(name)
    reference.eval(), fused.eval()  # no dropout: a micro-batch's masks would not be the batch's
    inputs = batch()
    ref_loss = run(reference, inputs).loss
    # As Trainer counts it: the labels kept after the shift, over the whole batch.
    num_items = (inputs["labels"][:, 1:] != -100).sum()
    fused.zero_grad(set_to_none=True)
    total = 0
    for row in range(2):
        micro = {k: v[row:row + 1] for k, v in inputs.items()}
        loss = fused(**micro, num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    reference_params = dict(reference.named_parameters())
    torch.testing.assert_close(total, ref_loss.detach(), rtol=RTOL, atol=ATOL)
    for pname, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[pname].grad, rtol=RTOL, atol=ATOL, msg=pname)


@pytest.mark.parametrize("name", NAMES)
def test_generate(name):
    reference, fused = pair(name)
    reference.eval(), fused.eval()
    inputs = batch(batch_size=1, seq=5, padded=False)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, got = reference.generate(**kwargs), fused.generate(**kwargs)
    assert got.shape == (1, 8)
    assert torch.equal(got, expected)


def test_gemma2_softcap():
    """Logits large enough for Gemma 2's soft cap (3.0) to matter: the random model's are
    of order 0.1, where tanh is the identity to 1e-3, so the head (the tied embedding) is
    scaled up. The fused model's loss and gradients are the capped ones, and the capped
    loss differs from the uncapped one, so that this test can fail."""
    reference = tiny_causal_lm("gemma2")
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(30)
    fused = fuse_causal_lm(copy.deepcopy(reference))
    inputs = batch()
    ref_out, fused_out = run(reference, inputs), run(fused, inputs)
    assert_same_training(reference, fused, ref_out.loss, fused_out.loss)
    with torch.no_grad():
        torch.manual_seed(0)
        reference.config.final_logit_softcapping = None
        uncapped = reference(**inputs).loss
    assert not torch.allclose(ref_out.loss, uncapped, rtol=0.1, atol=0)


def test_shift_labels_and_ignore_index():
    reference, fused = pair("llama")
    inputs = batch()
    shift_labels = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    shift_labels[0, 3] = 7  # a target the plain shift would not give
    ref_out = run(reference, dict(inputs, shift_labels=shift_labels))
    fused_out = run(fused, dict(inputs, shift_labels=shift_labels))
    assert_same_training(reference, fused, ref_out.loss, fused_out.loss)
    labels = inputs["labels"].masked_fill(inputs["labels"] == -100, 5)
    ref_out = run(reference, dict(inputs, labels=labels, ignore_index=5))
    fused_out = run(fused, dict(inputs, labels=labels, ignore_index=5))
    assert_same_training(reference, fused, ref_out.loss, fused_out.loss)


def test_router_aux_loss():
    """A mixture of experts adds its router loss to the LM loss, fused or not."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True, sliding_window=None)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # a loop over the experts: grouped_mm takes no float64
    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(config).double().train()
    fused = fuse_causal_lm(copy.deepcopy(reference))
    inputs = batch()
    ref_out, fused_out = run(reference, inputs), run(fused, inputs)
    assert ref_out.aux_loss is not None
    assert_same_training(reference, fused, ref_out.loss, fused_out.loss)


def test_backend_torch_matches_default():
    _, fused = pair("llama")
    torch_fused = fuse_causal_lm(copy.deepcopy(fused), backend="torch", chunk_size=5)  # a second fuse: new options
    inputs = batch()
    assert_same_training(fused, torch_fused, run(fused, inputs).loss, run(torch_fused, inputs).loss)


def test_torch_compile():
    """torch.compile(model) goes through the fused forward (dynamo's eager backend: the
    trace, not inductor's code generation, which this test does not need)."""
    _, fused = pair("llama")
    inputs = batch(seq=6)
    expected = run(fused, inputs)
    grads = {n: p.grad for n, p in fused.named_parameters()}
    compiled = torch.compile(fused, backend="eager")
    got = run(compiled, inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=RTOL, atol=ATOL)
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=RTOL, atol=ATOL, msg=n)


def test_accum_dtype_reaches_the_loss():
    """fuse_causal_lm's accum_dtype is the fused op's: the input's dtype (float64 here)
    gives the default's loss and gradients, and one the op refuses is refused at the call."""
    _, fused = pair("llama")
    summed = fuse_causal_lm(copy.deepcopy(fused), accum_dtype=torch.float64)
    inputs = batch()
    assert_same_training(fused, summed, run(fused, inputs).loss, run(summed, inputs).loss)
    fuse_causal_lm(summed, accum_dtype=torch.float16)
    with pytest.raises(ValueError, match="accum_dtype must be None, torch.float64 or the input's dtype"):
        summed(**inputs)


def test_unfuse_and_fuse_twice():
    model = tiny_causal_lm("llama")
    assert fuse_causal_lm(model) is model
    fused_forward = model.forward
    assert fuse_causal_lm(model, chunk_size=4) is model and model.forward is fused_forward  # not wrapped twice
    copied = copy.deepcopy(model)
    assert copied.forward is not fused_forward and copied.forward.model is copied
    inputs = batch()
    assert model(**inputs).logits is None and copied(**inputs).logits is None
    copied.lm_head = torch.nn.Linear(32, VOCAB, bias=False, dtype=torch.float64)  # a new head: fuse again
    with pytest.raises(RuntimeError, match="fuse the model again"):
        copied(**inputs)
    assert fuse_causal_lm(copied)(**inputs).logits is None
    assert unfuse_causal_lm(model) is model
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model(**inputs).logits.shape == (2, 12, VOCAB)
    assert unfuse_causal_lm(model) is model  # not fused: unchanged


def test_refuses_what_is_not_a_causal_lm():
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32))
    with pytest.raises(ValueError, match="not a causal LM"):
        fuse_causal_lm(bert)
    classifier = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(ValueError, match="not a causal LM"):
        fuse_causal_lm(classifier)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fuse_causal_lm(torch.nn.Linear(3, 4))


def test_refuses_logit_transforms():
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    with pytest.raises(ValueError, match="logit_scale"):  # Cohere: the config says so
        fuse_causal_lm(transformers.CohereForCausalLM(transformers.CohereConfig(**small)))
    # Granite's default logits_scaling is 1.0, which the config check lets by; forward's source does not.
    with pytest.raises(ValueError, match="logits_scaling"):
        fuse_causal_lm(transformers.GraniteForCausalLM(transformers.GraniteConfig(**small)))


def test_refuses_a_head_that_is_not_linear():
    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_causal_lm("llama")
    model.lm_head = ScaledHead(32, VOCAB, bias=False)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        fuse_causal_lm(model)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        fuse_causal_lm(model)


def test_refuses_labels_of_another_shape():
    _, fused = pair("llama")
    inputs = batch()
    with pytest.raises(ValueError, match="shape of input_ids"):
        fused(**dict(inputs, labels=inputs["labels"][:, :-1]))
    with pytest.raises(ValueError, match="one per token"):  # logits for the last position only
        fused(**inputs, logits_to_keep=1)
