"""The graph patterns myext fuses, shared by ``myext.fuse`` (graphs from
``torch.fx.symbolic_trace``) and the ``torch.compile`` backend (graphs dynamo captures).

Both kinds of graph call the same functions; they differ in how a Linear appears (an
``nn.Linear`` module, ``F.linear``, or ``torch._C._nn.linear`` once dynamo has inlined
the module) and in what they know: dynamo records each value's fake tensor in
``node.meta["example_value"]``, symbolic tracing knows no shapes. Where a rewrite needs a
shape that the graph does not give, :func:`linear_cross_entropy_chain` decides it at the
call instead.

A Linear whose logits reach a cross-entropy is fused through the steps a language
model puts between them (:func:`head_chain`): views of the batch dimensions, a slice of
the positions (the causal shift), a dtype cast (``.float()``), a soft cap written as
``tanh(x / c) * c``, and the move of the classes to dimension 1 that cross-entropy
wants for ``(B, T, C)`` logits. Each step is replayed on the hidden states instead,
whose last dimension is the Linear's input features rather than its classes.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as myext_nn
from .functional import cross_entropy, linear_cross_entropy

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


# --------------------------------------------------------------------------- Linear -> cross-entropy

class HeadChain(NamedTuple):
    """A Linear's logits on their way to a cross-entropy, as :func:`head_chain` finds them.

    Attributes:
        loss: the cross-entropy node.
        between: the nodes from the Linear's output to the loss's logits, in order.
        steps: the layout steps to replay on the hidden states, for
            :func:`linear_cross_entropy_chain`.
        softcap: ``c`` of a ``tanh(x / c) * c`` on the way, else None.
        dtype: the dtype the logits are cast to on the way, else None.
    """

    loss: fx.Node
    between: tuple[fx.Node, ...]
    steps: tuple[tuple[Any, ...], ...]
    softcap: Optional[float]
    dtype: Optional[torch.dtype]


_DTYPE_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                  "bfloat16": torch.bfloat16}
_NO_OPS = ("contiguous", "clone")
_DIVIDE = (operator.truediv, torch.div, torch.true_divide)
_MULTIPLY = (operator.mul, torch.mul)


def _example(node: Any) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_method_or_function(node: fx.Node, methods: tuple[str, ...], functions: tuple[Any, ...]) -> bool:
    return ((node.op == "call_method" and node.target in methods)
            or (node.op == "call_function" and node.target in functions))


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _softcap_at(node: fx.Node) -> Optional[tuple[float, tuple[fx.Node, fx.Node, fx.Node]]]:
    """``c`` and the three nodes where ``node`` starts ``tanh(x / c) * c``, else None."""
    if not (node.op == "call_function" and node.target in _DIVIDE and len(node.args) == 2 and not node.kwargs):
        return None
    cap = _number(node.args[1])
    tanh = _only_user(node)
    if cap is None or cap <= 0 or tanh is None or not _is_method_or_function(tanh, ("tanh",), (torch.tanh,)):
        return None
    mul = _only_user(tanh)
    if mul is None or not (mul.op in ("call_function", "call_method") and mul.target in (*_MULTIPLY, "mul")):
        return None
    if len(mul.args) != 2 or mul.kwargs or tanh not in mul.args:
        return None
    if _number(mul.args[1] if mul.args[0] is tanh else mul.args[0]) != cap:
        return None
    return cap, (node, tanh, mul)


def _cast_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """The dtype a ``.float()``/``.to(dtype)``/``.type(dtype)`` casts to, else None."""
    if node.op != "call_method":
        return None
    if node.target in _DTYPE_METHODS and len(node.args) == 1 and not node.kwargs:
        return _DTYPE_METHODS[node.target]
    if node.target in ("to", "type"):
        args = list(node.args[1:]) + list(node.kwargs.values())
        if len(args) == 1 and isinstance(args[0], torch.dtype) and set(node.kwargs) <= {"dtype"}:
            return args[0]
    return None


def step_name(node: fx.Node) -> str:
    """How a report names a step: the method's or the function's name."""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _layout_step(node: fx.Node, classes: Optional[int], ndim: Optional[int]) -> Union[tuple[Any, ...], str]:
    """The step ``node`` takes on logits of ``classes`` classes in their last dimension
    (of ``ndim`` dimensions where known), as :func:`replay` takes it, or why it is not
    one that commutes with the Linear."""
    name = step_name(node)
    if _is_method_or_function(node, ("view", "reshape"), (torch.reshape,)):
        shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if node.kwargs or not shape or classes is None or shape[-1] != classes:
            return f"{name} to a shape whose last dimension is not the classes'"
        return ("reshape", tuple(shape[:-1]))
    if _is_method_or_function(node, ("flatten",), (torch.flatten,)):
        start, end = call_args(node, ("input", "start_dim", "end_dim"))[1:]
        start, end = 0 if start is None else start, -1 if end is None else end
        if end < 0 and ndim is not None:
            end += ndim
        if end == -1 or (ndim is not None and end >= ndim - 1) or (end >= 0 and ndim is None):
            return "flatten through the classes' dimension"
        return ("flatten", start, end)
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        allowed = all(i is Ellipsis or i is None or isinstance(i, (int, slice)) for i in index)
        if not allowed:
            return "an index by tensor"
        if Ellipsis in index:
            after = [i for i in index[index.index(Ellipsis) + 1:] if i is not None]
            touches_classes = bool(after) and after[-1] != slice(None)
        else:
            addressed = [i for i in index if i is not None]
            if ndim is None:
                return "an index whose reach into the classes' dimension is unknown"
            touches_classes = len(addressed) >= ndim and addressed[ndim - 1] != slice(None)
        if touches_classes:
            return "an index into the classes' dimension"
        return ("getitem", index)
    return f"{name}, which myext does not fuse through"


def is_cross_entropy_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.cross_entropy


def head_chain(linear: fx.Node, classes: Optional[int],
               is_loss: Callable[[fx.Node], bool] = is_cross_entropy_call) -> Union[HeadChain, str]:
    """Follows the output of the Linear ``linear`` (of ``classes`` output features, None
    where the graph does not say) to a
    cross-entropy (a node ``is_loss`` accepts) through steps that commute with the Linear, each used only by the next.
    Returns the chain, or why there is none (a string)."""
    steps: list[tuple[Any, ...]] = []
    between: list[fx.Node] = []
    softcap: Optional[float] = None
    dtype: Optional[torch.dtype] = None
    node = linear
    while True:
        if any(user.op == "output" for user in node.users):
            what = "the logits" if node is linear else f"the logits' {node.name}"
            return f"{what} leave the graph (returned, or used past a graph break)"
        if len(node.users) != 1:
            users = ", ".join(user.name for user in node.users) or "nothing"
            what = "the logits" if node is linear else f"the logits' {node.name}"
            return f"{what} are used by {users}, not only by a cross-entropy"
        (user,) = node.users
        if is_loss(user):
            if user.args[:1] != (node,):
                return "the logits are the cross-entropy's target, not its input"
            return HeadChain(user, tuple(between), tuple(steps), softcap, dtype)
        example = _example(node)
        ndim = example.dim() if example is not None else None
        if (found := _softcap_at(user)) is not None:
            if softcap is not None:
                return "a second soft cap"
            softcap, nodes = found
            between += nodes
            node = nodes[-1]
            continue
        if (cast := _cast_dtype(user)) is not None:
            dtype = cast
        elif user.op == "call_method" and user.target in _NO_OPS and len(user.args) == 1 and not user.kwargs:
            pass
        elif ("classes_second",) in steps:
            # The last dimension is no longer the classes': nothing but casts from here.
            return f"{step_name(user)} after the classes' move to dimension 1"
        elif (classes_second := _classes_to_dim_1(user, ndim)) is not None:
            if not classes_second:
                return "a transpose or permute other than the classes to dimension 1 of (B, T, C) logits"
            steps.append(("classes_second",))
        else:
            step = _layout_step(user, classes, ndim)
            if isinstance(step, str):
                return step
            steps.append(step)
        between.append(user)
        node = user


def _classes_to_dim_1(node: fx.Node, ndim: Optional[int]) -> Optional[bool]:
    """None if ``node`` is no transpose/permute; else whether it is the one that turns
    (B, T, C) logits into the (B, C, T) that cross-entropy reads."""
    if _is_method_or_function(node, ("transpose",), (torch.transpose,)):
        dims = node.args[1:3]
    elif _is_method_or_function(node, ("permute",), (torch.permute,)):
        dims = node.args[1:]
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
    elif _is_method_or_function(node, ("t",), (torch.t,)):
        return False
    else:
        return None
    if ndim != 3:
        return False
    dims = tuple(d % 3 if isinstance(d, int) else d for d in dims)
    return dims in ((1, 2), (2, 1), (0, 2, 1))


def replay(x: torch.Tensor, steps: tuple[tuple[Any, ...], ...], features: int) -> torch.Tensor:
    """The layout ``steps`` of :func:`head_chain` applied to ``x``, whose last dimension
    holds ``features`` (the hidden states' or the logits')."""
    for kind, *args in steps:
        if kind == "reshape":
            x = x.reshape(*args[0], features)
        elif kind == "flatten":
            x = x.flatten(*args)
        elif kind == "getitem":
            x = x[args[0]]
        elif kind == "classes_second":
            x = x.transpose(1, 2)
        else:
            raise AssertionError(kind)
    return x


def linear_cross_entropy_chain(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                               target: torch.Tensor, *, steps: tuple[tuple[Any, ...], ...] = (),
                               softcap: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                               backend: Optional[str] = None, accum_dtype: Optional[torch.dtype] = None,
                               **options: Any) -> torch.Tensor:
    """``F.cross_entropy(chain(F.linear(input, linear_weight, linear_bias)), target, **options)``
    for the chain of :func:`head_chain`, as one :func:`myext.linear_cross_entropy` on the
    hidden states laid out as the chain lays out the logits.

    Where the laid-out logits are ``(N, C)`` or ``(C)`` their rows are the hidden states'
    rows; ``(B, C, T)`` ones come from ``(B, T, C)`` by the chain's move of the classes, and
    the hidden states stay ``(B, T, H)``. Any other result (more dimensions, whose
    classes cross-entropy reads second) runs the two steps as written. ``dtype`` is the
    loss's dtype: the logits' cast, where the chain makes one. ``accum_dtype`` is the fused
    op's, where it fuses."""
    classes_second = ("classes_second",) in steps
    x = replay(input, tuple(s for s in steps if s[0] != "classes_second"), input.shape[-1])
    fuses = x.dim() == 3 if classes_second else x.dim() <= 2
    if fuses:
        loss = linear_cross_entropy(x, linear_weight, target, linear_bias=linear_bias, softcap=softcap,
                                    backend=backend, accum_dtype=accum_dtype, **options)
    else:
        logits = replay(F.linear(input, linear_weight, linear_bias), steps, linear_weight.shape[0])
        loss = cross_entropy(logits if dtype is None else logits.to(dtype), target, softcap=softcap,
                             backend=backend, **options)
    return loss if dtype is None else loss.to(dtype)
