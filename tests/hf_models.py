"""Tiny, randomly initialised Hugging Face causal LMs, built from configs in the test
(no downloads): one per architecture the integrations are tested on."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 97  # prime, so no chunk or tile divides it
HIDDEN = 32

# Each: the config class and its model class, the config's own arguments, and what the
# architecture adds to the tests (tied embeddings, a final soft cap).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, sliding_window=8)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),  # no dropout: runs comparable
}


def tiny_causal_lm(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """The architecture ``name``'s causal LM, tiny and random, in training mode, eager
    attention (so that every path is the same on every machine)."""
    config_class, model_class, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).to(dtype)
    return model.train()


def batch(batch_size: int = 2, seq: int = 12, *, padded: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels: the labels are the inputs, -100 where the
    second sequence is padded (its last three positions)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    if padded and batch_size > 1:
        attention_mask[1, -3:] = 0
        labels[1, -3:] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
