"""The graph patterns myext fuses, shared by ``myext.fuse`` (graphs from
``torch.fx.symbolic_trace``) and the ``torch.compile`` backend (graphs dynamo captures).

Both kinds of graph call the same functions; they differ in how a Linear appears (an
``nn.Linear`` module, ``F.linear``, or ``torch._C._nn.linear`` once dynamo has inlined
the module).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as myext_nn

# The call_function targets of a Linear: F.linear, and what dynamo records for it.
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
# F.relu, torch.relu and their in-place forms (F.relu_ is torch.relu_ itself), with the
# names a fusion report gives them.
RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
RELU_METHODS = ("relu", "relu_")
_CROSS_ENTROPY_SIGNATURE = inspect.signature(F.cross_entropy)


def call_args(node: fx.Node, names: tuple[str, ...]) -> list[Any]:
    """The node's arguments in the order of ``names`` (positional or keyword), None if absent."""
    values = list(node.args) + [None] * (len(names) - len(node.args))
    for i, arg_name in enumerate(names):
        if arg_name in node.kwargs:
            values[i] = node.kwargs[arg_name]
    return values[:len(names)]


def module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def linear_kind(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """'module' for a call of an nn.Linear, 'function' for F.linear, else None."""
    if node.op == "call_module":
        module = module_of(gm, node)
        # A subclass with its own forward may compute something else: only Linear.forward fuses.
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            return "module"
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        return "function"
    return None


def relu_name(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """How the node applies a ReLU to its first argument ('nn.ReLU', 'F.relu', ...), or None."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if isinstance(module, nn.ReLU) and type(module).forward is nn.ReLU.forward:
            return f"{node.target} (nn.ReLU)"
    elif node.op == "call_function" and node.target in RELU_FUNCTIONS:
        return RELU_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in RELU_METHODS:
        return f"Tensor.{node.target}"
    return None


def cross_entropy_options(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[Any, Any, dict[str, Any], str]]:
    """For a cross-entropy node (an nn.CrossEntropyLoss module or F.cross_entropy):
    (its logits, its target, its options as keywords of myext's, how it is named); a
    module's class weight is given as the name of its buffer. None for anything else,
    and for calls with the deprecated size_average or reduce."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if not (isinstance(module, nn.CrossEntropyLoss) and not isinstance(module, myext_nn.CrossEntropyLoss)
                and type(module).forward is nn.CrossEntropyLoss.forward):
            return None
        logits, target = call_args(node, ("input", "target"))
        weight = f"{node.target}.weight" if module.weight is not None else None
        return logits, target, dict(weight=weight, ignore_index=module.ignore_index, reduction=module.reduction,
                                    label_smoothing=module.label_smoothing), f"{node.target} (nn.CrossEntropyLoss)"
    if node.op == "call_function" and node.target is F.cross_entropy:
        bound = _CROSS_ENTROPY_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        # The deprecated flags fold into reduction with PyTorch's warnings; rather than
        # re-implement that, such calls keep running PyTorch's op.
        if arguments.pop("size_average") is not None or arguments.pop("reduce") is not None:
            return None
        return arguments.pop("input"), arguments.pop("target"), arguments, f"{node.name} (F.cross_entropy)"
    return None
