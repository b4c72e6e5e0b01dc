"""Hugging Face causal language models whose training loss is :func:`myext.linear_cross_entropy`.

``fuse_causal_lm(model)`` makes a ``transformers`` causal LM (``LlamaForCausalLM``,
``GPT2LMHeadModel``, ...) compute its loss from the hidden states and the output layer's
weight in chunks, so that a call with ``labels`` never holds the ``(batch, seq, vocab)``
logits, in the forward pass or the backward one. It wraps the model's own forward: one
code path for every architecture with the standard layout (a ``nn.Linear`` head whose
output goes to ``self.loss_function``, the causal-LM loss), no copied forward methods.
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from typing import Any, Optional

import torch
from torch import nn

import transformers
from transformers.loss.loss_utils import LOSS_MAPPING

from ..ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["fuse_causal_lm", "unfuse_causal_lm"]

# Config attributes that transform the logits between the head and the loss in ways the
# fused loss does not reproduce (Gemma's final_logit_softcapping is reproduced): a scale
# (Cohere, Aya Vision, MPT), a divisor (Granite and its family, HyperCLOVA X, MiniCPM3),
# a multiplier (Falcon-H1, Muse, Inkling's muP), another soft cap (RecurrentGemma, xLSTM).
# Each with the value that leaves the logits as they are, or None where any value changes them.
_LOGIT_TRANSFORMS = {
    "logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0, "output_multiplier": 1.0,
    "logits_mup_width_multiplier": 1.0, "logits_soft_cap": None, "output_logit_soft_cap": None,
}
_SOFTCAP = "final_logit_softcapping"


def fuse_causal_lm(model: transformers.PreTrainedModel, *, backend: Optional[str] = None,
                   chunk_size: Optional[int] = None,
                   accum_dtype: Optional[torch.dtype] = None) -> transformers.PreTrainedModel:
    r"""Makes a Hugging Face causal LM compute its loss with :func:`myext.linear_cross_entropy`.

    The model is changed in place: its ``forward`` (an instance attribute, so that
    ``model(...)``, ``generate()`` and ``torch.compile(model)`` go through it) runs the
    model's own forward. Called without ``labels`` it is that forward, unchanged: the
    logits as before, generation as before. Called with ``labels``, the forward runs
    with ``labels=None`` and the output layer (``model.get_output_embeddings()``, whose
    ``forward`` is switched at fuse time) records its input hidden states and returns an
    empty ``(*, 0)`` tensor for that call, so that no logits are made; the loss is then ``linear_cross_entropy(hidden_states, head.weight,
    labels, linear_bias=head.bias, shift=1)``, as Hugging Face's causal-LM loss is:
    tokens ``< t`` predict token ``t``, labels ``ignore_index`` (-100, or the
    ``ignore_index`` keyword of the call) ignored, the mean over the others, or the sum
    divided by ``num_items_in_batch`` when the call gives one (as ``Trainer`` does for
    gradient accumulation). A ``shift_labels`` keyword is the target itself, unshifted.
    The config's ``final_logit_softcapping`` (Gemma 2 and 3) is the loss's ``softcap``;
    a mixture of experts' router loss (``aux_loss`` in the output, with
    ``output_router_logits=True``) is added as the model adds it.

    The output is the model's own output class, with ``loss`` set and ``logits=None``;
    with ``return_dict=False`` (the call's or the config's) it is that output's tuple,
    which, as every Hugging Face tuple, leaves out what is None (the logits). The loss is
    float32, as the model's is (Hugging Face upcasts the logits): for a float32 or float64
    model it is the fused op's loss; for bfloat16 or float16 the op accumulates in float32
    and returns the loss rounded to the model's dtype, and that rounded value is cast to
    float32. Tied input and output embeddings need nothing: the head's weight is the
    embedding, and gets its gradient from the loss.

    Fusing is idempotent: fusing a fused model wraps nothing twice and takes the new
    ``backend``, ``chunk_size`` and ``accum_dtype`` (and captures its output layer again if it was
    replaced since). :func:`unfuse_causal_lm` undoes it.

    Args:
        model: a ``transformers.PreTrainedModel`` with the causal-LM loss
            (``model.loss_function`` is ``LOSS_MAPPING["ForCausalLM"]``), an
            ``nn.Linear`` output layer called once in forward, whose output goes to the
            loss untransformed or only soft-capped by ``final_logit_softcapping``.
        backend: the backend of :func:`myext.linear_cross_entropy`; ``None`` picks the
            best for the model's device.
        chunk_size: rows per chunk of logits; ``None`` chooses from the shapes.
        accum_dtype: the dtype the head's weight gradient is summed in over the chunks,
            as :func:`myext.linear_cross_entropy`'s: ``None`` (float32 for a bfloat16
            or float16 model), or the model's dtype for the least memory.

    Returns:
        ``model``, fused.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, or its output layer is not an
            ``nn.Linear``.
        ValueError: ``model`` is not a causal LM (another loss), or transforms its logits
            between the head and the loss in a way the fused loss does not reproduce
            (Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...), or adds to
            its loss other than a router loss.

    Example::

        >>> model = fuse_causal_lm(transformers.AutoModelForCausalLM.from_pretrained(name))
        >>> out = model(input_ids=ids, attention_mask=mask, labels=ids)
        >>> out.loss.backward()     # out.logits is None: no (batch, seq, vocab) tensor was made
    """
    current = model.__dict__.get("forward") if isinstance(model, nn.Module) else None
    if isinstance(current, _FusedForward):
        current.backend, current.chunk_size, current.accum_dtype = backend, chunk_size, accum_dtype
        head = model.get_output_embeddings()
        head_forward = head.__dict__.get("forward") if isinstance(head, nn.Module) else None
        if not (isinstance(head_forward, _HeadForward) and head_forward.owner is current):
            current.layout = _check_layout(model)  # the head was replaced since: check and capture the new one
            head.forward = _HeadForward(head, head_forward, current)
        return model
    layout = _check_layout(model)
    fused = _FusedForward(model, current, layout, backend, chunk_size, accum_dtype)
    head = model.get_output_embeddings()
    head.forward = _HeadForward(head, head.__dict__.get("forward"), fused)
    model.forward = fused
    return model


def unfuse_causal_lm(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Undoes :func:`fuse_causal_lm`: ``model`` computes its loss from its logits again.

    In place; returns ``model``. A model that is not fused is returned as it is.

    Raises:
        RuntimeError: ``model.forward`` was replaced after fusing (a hook that wraps it),
            so that removing the fused forward would remove that too.
    """
    current = model.__dict__.get("forward")
    if isinstance(current, _FusedForward):
        for module in model.modules():
            head_forward = module.__dict__.get("forward")
            if isinstance(head_forward, _HeadForward) and head_forward.owner is current:
                _restore(module, head_forward.instance_forward)
        _restore(model, current.instance_forward)
        return model
    if any(isinstance(v, _FusedForward) for v in _closure_values(current)):
        raise RuntimeError("model.forward was replaced after fuse_causal_lm (it wraps the fused forward); "
                           "remove that wrapper first")
    return model


def _restore(module: nn.Module, instance_forward: Any) -> None:
    if instance_forward is None:
        del module.forward
    else:
        module.forward = instance_forward


def _closure_values(function: Any) -> list:
    cells = getattr(getattr(function, "__func__", function), "__closure__", None) or ()
    values = [c.cell_contents for c in cells if c.cell_contents is not None]
    return values + list(getattr(function, "args", ()))  # functools.partial


# --------------------------------------------------------------------------- layout


class _Layout:
    """What fuse-time checks found: whether forward soft-caps with the config's
    ``final_logit_softcapping`` (None: its source was not read, the config decides), and
    the attribute path of a router loss coefficient forward adds to the loss."""

    def __init__(self, softcap_in_forward: Optional[bool], aux_coefficient: Optional[str]):
        self.softcap_in_forward = softcap_in_forward
        self.aux_coefficient = aux_coefficient


def _check_layout(model: Any) -> _Layout:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"fuse_causal_lm takes a transformers.PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    causal = LOSS_MAPPING["ForCausalLM"]
    if getattr(model, "loss_function", None) is not causal:
        raise ValueError(f"{name} is not a causal LM: its loss_function is "
                         f"{getattr(model.loss_function, '__name__', model.loss_function)!r}, not "
                         f"{causal.__name__} (LOSS_MAPPING['ForCausalLM']); fuse_causal_lm fuses that loss only")
    if "labels" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{name}.forward takes no labels; fuse_causal_lm fuses the loss forward computes from them")
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{name} has no output embeddings (get_output_embeddings() is None): no head to fuse")
    if type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear):
        raise TypeError(f"{name}'s output embeddings are {type(head).__name__}, not an nn.Linear: fuse_causal_lm "
                        "computes the head as F.linear(hidden, weight, bias) and cannot reproduce another forward")
    configs = [model.config]
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        configs.append(text)
    for config in configs:
        for attribute, identity in _LOGIT_TRANSFORMS.items():
            value = getattr(config, attribute, None)
            if value is not None and (identity is None or value != identity):
                raise ValueError(f"{name}'s config sets {attribute}={value!r}, which transforms the logits between "
                                 "the head and the loss; the fused loss reproduces final_logit_softcapping only")
    head_names = [n for n, m in model.named_children() if m is head]
    return _scan_forward(model, head_names)


def _scan_forward(model: Any, head_names: list) -> _Layout:
    """Reads the source of the model class's forward: the head is called once, as
    ``logits = self.<head>(...)``, and its logits go to ``self.loss_function`` changed by
    nothing but the final soft cap; after the loss, forward adds nothing to it but a
    router loss. Where the source cannot be read, the config checks alone decide."""
    name = type(model).__name__
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(type(model).forward)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return _Layout(None, None)

    def is_self_call(node: ast.AST, attributes) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                and node.func.attr in attributes)

    nodes = sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset))
    head_calls = [n for n in nodes if is_self_call(n, head_names)]
    loss_calls = [n for n in nodes if is_self_call(n, ("loss_function",))]
    if len(head_calls) != 1 or len(loss_calls) != 1:
        raise ValueError(f"{name}.forward does not have the causal-LM layout fuse_causal_lm fuses: it calls its "
                         f"output layer (self.{'/'.join(head_names) or '?'}) {len(head_calls)} times and "
                         f"self.loss_function {len(loss_calls)} times, not once each")
    head_call, loss_call = head_calls[0], loss_calls[0]
    statements = [n for n in nodes if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
    head_statement = [s for s in statements if s.lineno <= head_call.lineno <= s.end_lineno]
    if (len(head_statement) != 1 or not isinstance(head_statement[0], ast.Assign)
            or head_statement[0].value is not head_call):
        raise ValueError(f"{name}.forward transforms its output layer's result in the statement that calls it "
                         f"(line {head_call.lineno} of forward); fuse_causal_lm needs `logits = self.head(...)`")
    softcap = False
    for statement in statements:
        if not head_statement[0].end_lineno < statement.lineno < loss_call.lineno:
            continue
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        if not any(isinstance(n, ast.Name) and n.id == "logits" for t in targets for n in ast.walk(t)):
            continue
        text = ast.unparse(statement)
        if _SOFTCAP in text or text == "logits = torch.tanh(logits)":
            softcap = True
        elif text != "logits = logits.float()":
            raise ValueError(f"{name}.forward transforms the logits between the head and the loss (`{text}`), "
                             "which the fused loss does not reproduce (only final_logit_softcapping)")
    aux = None
    for statement in statements:
        if statement.lineno <= loss_call.end_lineno:
            continue
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        if not any(isinstance(t, ast.Name) and t.id == "loss" for t in targets):
            continue
        aux = _router_coefficient(statement)
        if aux is None:
            raise ValueError(f"{name}.forward adds to its loss after self.loss_function (`{ast.unparse(statement)}`),"
                             " which fuse_causal_lm does not reproduce")
    return _Layout(softcap, aux)


def _router_coefficient(statement: ast.AST) -> Optional[str]:
    """``loss += self.<path>.router_aux_loss_coef * aux_loss...``: the path's attribute
    names, ``"router_aux_loss_coef"`` or ``"config.text_config.router_aux_loss_coef"``."""
    if not (isinstance(statement, ast.AugAssign) and isinstance(statement.op, ast.Add)
            and isinstance(statement.value, ast.BinOp) and isinstance(statement.value.op, ast.Mult)):
        return None
    left, right = statement.value.left, statement.value.right
    path = ast.unparse(left)
    if not (path.startswith("self.") and path.endswith("router_aux_loss_coef")
            and all(isinstance(n, (ast.Attribute, ast.Name, ast.Load)) for n in ast.walk(left))):
        return None
    if "aux_loss" not in {n.id for n in ast.walk(right) if isinstance(n, ast.Name)}:
        return None
    return path[len("self."):]


# --------------------------------------------------------------------------- forward


class _FusedForward:
    """The fused model's ``forward``: its own forward without labels; with them, that
    forward with the head captured, and the loss fused. An object (not a closure), so
    that ``copy.deepcopy`` and pickling of the model carry it over to the copy."""

    def __init__(self, model: nn.Module, instance_forward: Any, layout: _Layout, backend: Optional[str],
                 chunk_size: Optional[int], accum_dtype: Optional[torch.dtype]):
        self.model = model
        self.instance_forward = instance_forward  # a forward the instance had before fusing (a hook's)
        self.layout = layout
        self.backend = backend
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype
        self.captured = None  # during a call with labels, the hidden states the head was called on

    def original(self):
        """The forward the model had before fusing, bound to it."""
        if self.instance_forward is not None:
            return self.instance_forward
        return type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        # Trainer reads forward's signature for the dataset columns and loss keywords it passes.
        return inspect.signature(self.original())

    def __repr__(self) -> str:
        return f"<myext fused forward of {type(self.model).__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.original()
        parameters = list(inspect.signature(forward).parameters)
        labels, args = _take(parameters, "labels", args, kwargs)
        if labels is None:
            return forward(*args, **kwargs)
        model = self.model
        input_ids = _peek(parameters, "input_ids", args, kwargs)
        inputs_embeds = _peek(parameters, "inputs_embeds", args, kwargs)
        expected = (tuple(input_ids.shape) if input_ids is not None
                    else tuple(inputs_embeds.shape[:-1]) if inputs_embeds is not None else None)
        if not isinstance(labels, torch.Tensor) or (expected is not None and tuple(labels.shape) != expected):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have the shape of input_ids (or of inputs_embeds without its last "
                             f"dimension), {expected}, got {got}")
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        if not return_dict:
            kwargs["return_dict"] = True
        # num_items_in_batch, ignore_index and shift_labels stay in kwargs: forward passes
        # them to the base model as it does unfused, and computes no loss without labels.
        shift_labels = kwargs.get("shift_labels")
        normalizer = kwargs.get("num_items_in_batch")
        ignore_index = kwargs.get("ignore_index", -100)

        head = model.get_output_embeddings()
        head_forward = head.__dict__.get("forward")
        if not isinstance(head_forward, _HeadForward) or head_forward.owner is not self:
            raise RuntimeError(f"{type(model).__name__}'s output embeddings were replaced after fuse_causal_lm; "
                               "fuse the model again")
        # The head's forward captures its input for this call, and makes no logits.
        self.captured = captured = []
        try:
            output = forward(*args, **kwargs)
        finally:
            self.captured = None
        if len(captured) != 1:
            raise RuntimeError(f"{type(model).__name__}.forward called its output layer {len(captured)} times, "
                               "not once: the fused loss needs the one call's hidden states")
        if not isinstance(output, transformers.utils.ModelOutput):
            raise TypeError(f"{type(model).__name__}.forward returned {type(output).__name__} for return_dict=True, "
                            "not a ModelOutput")
        hidden = captured[0]
        target, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"the output layer saw hidden states {tuple(hidden.shape)} for "
                             f"{'labels' if shift == 1 else 'shift_labels'} {tuple(target.shape)}: the loss needs "
                             "one per token (logits_to_keep=0)")
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.to(hidden.device)
        softcap = self._softcap()
        loss = linear_cross_entropy(hidden, head.weight, target.to(hidden.device), linear_bias=head.bias,
                                    ignore_index=ignore_index, shift=shift, softcap=softcap, normalizer=normalizer,
                                    reduction="mean", backend=self.backend, chunk_size=self.chunk_size,
                                    accum_dtype=self.accum_dtype).float()
        aux_loss = getattr(output, "aux_loss", None)
        if self.layout.aux_coefficient is not None and aux_loss is not None:
            coefficient = operator.attrgetter(self.layout.aux_coefficient)(model)
            loss = (loss + coefficient * aux_loss.to(loss.device)).to(loss.dtype)  # as forward's loss +=
        fields = {k: v for k, v in output.items() if k != "logits"}
        fields["loss"] = loss
        output = type(output)(**fields)
        return output if return_dict else output.to_tuple()

    def _softcap(self) -> Optional[float]:
        if self.layout.softcap_in_forward is False:
            return None
        config = self.model.config
        value = getattr(config, _SOFTCAP, None)
        if value is None and hasattr(config, "get_text_config"):
            value = getattr(config.get_text_config(decoder=True), _SOFTCAP, None)
        return value


class _HeadForward:
    """The output layer's ``forward`` while fused: ``nn.Linear``'s (or the one the layer
    had), except during a fused call with labels, where it records its input and returns
    an empty ``(*, 0)`` tensor, logits of no class, so that forward makes none and what
    it does to them after the head (Gemma's soft cap) costs nothing. Installed once at
    fuse time and switched by the fused forward's state, not swapped at each call, so
    that torch.compile traces a call without a module attribute changing under it."""

    def __init__(self, head: nn.Linear, instance_forward: Any, owner: _FusedForward):
        self.head = head
        self.instance_forward = instance_forward
        self.owner = owner

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        captured = self.owner.captured
        if captured is None:
            if self.instance_forward is not None:
                return self.instance_forward(hidden)
            return nn.Linear.forward(self.head, hidden)
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def __repr__(self) -> str:
        return "<myext fused head forward>"


def _take(parameters: list, name: str, args: tuple, kwargs: dict):
    """Removes argument ``name`` from the call (a keyword, or the positional one, which
    becomes None); returns its value and the positional arguments."""
    if name in kwargs:
        return kwargs.pop(name), args
    index = parameters.index(name) if name in parameters else len(args)
    if index < len(args):
        value = args[index]
        return value, args[:index] + (None,) + args[index + 1:]
    return None, args


def _peek(parameters: list, name: str, args: tuple, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    index = parameters.index(name) if name in parameters else len(args)
    return args[index] if index < len(args) else None
