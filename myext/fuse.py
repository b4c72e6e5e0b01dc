"""Whole-model fusion: rewrite a model's graph to run on myext's ops.

``myext.fuse(model)`` traces ``model`` with torch.fx and rewrites the graph:

* every Linear (``nn.Linear`` module or ``F.linear``) whose output goes only into a ReLU
  (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not) becomes one
  :func:`myext.linear_relu`;
* every Linear whose output goes only into a cross-entropy (``nn.CrossEntropyLoss`` or
  ``F.cross_entropy``) becomes one :func:`myext.linear_cross_entropy`, the logits never
  held whole;
* every other ``nn.CrossEntropyLoss`` module and ``F.cross_entropy`` call becomes myext's.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Any, NamedTuple, Optional

from torch import fx, nn

from . import nn as myext_nn
from ._patterns import (call_args, cross_entropy_options, head_chain, linear_cross_entropy_chain, linear_kind,
                        module_of, relu_name, step_name)
from .functional import cross_entropy, linear_relu

__all__ = ["FuseTraceError", "Fusion", "fuse"]

logger = logging.getLogger(__name__)

class FuseTraceError(fx.proxy.TraceError):
    """Raised when :func:`myext.fuse` cannot trace a model with torch.fx."""


class Fusion(NamedTuple):
    """One rewrite made by :func:`myext.fuse`.

    Attributes:
        kind: ``"linear_relu"``, ``"linear_cross_entropy"`` or ``"cross_entropy"``.
        original: what the model ran, e.g. ``"fc1 (nn.Linear) + torch.relu"``.
        replacement: what the fused model runs instead, e.g. ``"fc1 (myext.nn.FusedLinearReLU)"``.
    """

    kind: str
    original: str
    replacement: str

    def __str__(self) -> str:
        return f"{self.original} -> {self.replacement}"


class _Tracer(fx.Tracer):
    # myext's own modules run data-dependent argument checks that a Proxy cannot
    # answer; they are already fused, so they stay whole.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (myext_nn.FusedLinearReLU, myext_nn.CrossEntropyLoss)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fuse(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    concrete_args: Optional[dict[str, Any]] = None,
) -> fx.GraphModule:
    r"""Returns ``model`` rewritten to run its Linear+ReLU pairs and cross-entropies on myext's ops.

    The model is traced with ``torch.fx``. In the traced graph, each Linear (an ``nn.Linear``
    module or ``F.linear``) whose output feeds only a ReLU (``nn.ReLU``, ``F.relu``,
    ``torch.relu``, ``Tensor.relu``, in place or not) becomes one fused
    :func:`myext.linear_relu`; a Linear whose output is also used elsewhere is left as it
    is, since its pre-activation is needed. Each Linear whose output feeds only a
    cross-entropy (``nn.CrossEntropyLoss`` or ``F.cross_entropy``) becomes one
    :func:`myext.linear_cross_entropy` with the loss's options (for inputs of more than
    two dimensions, whose logits cross-entropy reads classes-second, it keeps the two
    steps). Each other ``nn.CrossEntropyLoss`` and ``F.cross_entropy`` becomes
    :class:`myext.nn.CrossEntropyLoss` / :func:`myext.cross_entropy`. Calls that pass
    the deprecated ``size_average`` or ``reduce`` are left alone. Outputs equal the
    original model's up to floating-point rounding, in forward and backward.

    **Parameters and buffers are shared, not copied**: the fused model holds the
    original's ``nn.Parameter`` objects, so training either trains both, and its
    ``state_dict`` has the original's keys. Fuse ``copy.deepcopy(model)`` for an
    independent model.

    What was rewritten is listed in ``fused_model.myext_fusions`` (a list of
    :class:`Fusion`), and Linear+ReLU pairs left alone in ``fused_model.myext_skipped``,
    both also logged at INFO level to the ``myext.fuse`` logger. A model with nothing to
    fuse gives a ``UserWarning``.

    Args:
        model: the model; its ``forward`` must be traceable by ``torch.fx.symbolic_trace``.
        backend: the kernels the fused ops run (see :func:`myext.linear_relu`); ``None``
            picks ``$MYEXT_BACKEND`` or the best for the input's device at each call.
        concrete_args: passed to the tracer, to fix arguments that steer Python control
            flow (see ``torch.fx.symbolic_trace``).

    Returns:
        A ``torch.fx.GraphModule`` in ``model``'s training mode.

    Raises:
        FuseTraceError: if torch.fx cannot trace the model (a subclass of
            ``torch.fx.proxy.TraceError``, raised from the tracer's own error).

    Example::

        >>> fused = myext.fuse(ArticleSimpleNet())
        >>> [str(f) for f in fused.myext_fusions]
        ['fc1 (nn.Linear) + torch.relu -> fc1 (myext.nn.FusedLinearReLU)']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    try:
        graph = _Tracer().trace(model, concrete_args=concrete_args)
    except Exception as err:
        # Tracing runs forward on Proxy objects: any failure in there (a TraceError for
        # control flow on tensor values, a TypeError from code that wants real tensors)
        # means the model is not symbolically traceable, not that it is broken.
        raise FuseTraceError(
            f"myext.fuse could not trace {name} with torch.fx: {type(err).__name__}: {err}\n"
            f"To fuse it anyway: pass concrete_args for arguments that steer control flow; or fuse "
            f"its traceable submodules one by one (model.part = myext.fuse(model.part)); or build it "
            f"from myext.nn.FusedLinearReLU and myext.nn.CrossEntropyLoss directly."
        ) from err
    gm = fx.GraphModule(model, graph, class_name=f"Fused{name}")

    fusions: list[Fusion] = []
    skipped: list[str] = []
    _fuse_linear_relu(gm, backend, fusions, skipped)
    _fuse_linear_cross_entropy(gm, backend, fusions)
    _replace_cross_entropy(gm, backend, fusions)
    gm.graph.lint()
    gm.recompile()

    gm.myext_fusions = fusions
    gm.myext_skipped = skipped
    if fusions:
        logger.info("myext.fuse(%s): %d rewrite(s)\n  %s", name, len(fusions), "\n  ".join(map(str, fusions)))
    else:
        warnings.warn(f"myext.fuse found nothing to fuse in {name}: no Linear followed only by a ReLU, "
                      f"and no cross-entropy", UserWarning, stacklevel=2)
    for reason in skipped:
        logger.info("myext.fuse(%s): left alone: %s", name, reason)
    return gm


def _fuse_linear_relu(gm: fx.GraphModule, backend: Optional[str], fusions: list[Fusion], skipped: list[str]) -> None:
    graph = gm.graph
    pairs: list[tuple[fx.Node, fx.Node, str]] = []
    for node in graph.nodes:
        if linear_kind(gm, node) is None:
            continue
        relus = [(user, relu_name(gm, user)) for user in node.users]
        relus = [(user, how) for user, how in relus if how is not None and user.args and user.args[0] is node]
        if not relus:
            continue
        if len(node.users) > 1:
            others = ", ".join(user.name for user in node.users)
            skipped.append(f"{_describe_linear(gm, node)}: its output is also used without the ReLU (by {others})")
            continue
        pairs.append((node, relus[0][0], relus[0][1]))

    # A Linear module called only where it fuses is swapped for a FusedLinearReLU of the same
    # name, which keeps the module tree and state_dict keys; one also called unfused stays,
    # and its fused calls run myext.linear_relu on its parameters.
    fused_calls = Counter(linear.target for linear, _, _ in pairs if linear.op == "call_module")
    all_calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    swapped: set[str] = set()
    relu_modules: set[str] = set()

    for linear, relu, relu_how in pairs:
        original = f"{_describe_linear(gm, linear)} + {relu_how}"
        if relu.op == "call_module":
            relu_modules.add(relu.target)
        if linear.op == "call_module" and fused_calls[linear.target] == all_calls[linear.target]:
            if linear.target not in swapped:
                _set_submodule(gm, linear.target,
                               myext_nn.FusedLinearReLU.from_linear(gm.get_submodule(linear.target), backend))
                swapped.add(linear.target)
            fused_node = linear
            replacement = f"{linear.target} (myext.nn.FusedLinearReLU)"
        else:
            with graph.inserting_before(linear):
                fused_node = graph.call_function(linear_relu, _linear_operands(gm, linear), {"backend": backend})
            replacement = "myext.linear_relu"
        relu.replace_all_uses_with(fused_node)
        graph.erase_node(relu)
        if fused_node is not linear:
            graph.erase_node(linear)
        fusions.append(Fusion("linear_relu", original, replacement))

    still_called = {node.target for node in graph.nodes if node.op == "call_module"}
    for target in relu_modules - still_called:
        gm.delete_submodule(target)


def _linear_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a Linear node, as graph values at the insertion point:
    an nn.Linear module's parameters are read with get_attr."""
    if node.op != "call_module":
        return tuple(call_args(node, ("input", "weight", "bias")))
    (x,) = call_args(node, ("input",))
    weight = gm.graph.get_attr(f"{node.target}.weight")
    bias = gm.graph.get_attr(f"{node.target}.bias") if gm.get_submodule(node.target).bias is not None else None
    return x, weight, bias


def _describe_linear(gm: fx.GraphModule, node: fx.Node) -> str:
    return f"{node.target} (nn.Linear)" if node.op == "call_module" else f"{node.name} (F.linear)"


def _fuse_linear_cross_entropy(gm: fx.GraphModule, backend: Optional[str], fusions: list[Fusion]) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.graph is not graph or linear_kind(gm, node) is None:
            continue
        chain = head_chain(node, _classes(gm, node), lambda n: cross_entropy_options(gm, n) is not None)
        if isinstance(chain, str):
            continue
        loss = chain.loss
        _, target, options, loss_name = cross_entropy_options(gm, loss)
        with graph.inserting_before(loss):
            if loss.op == "call_module" and options["weight"] is not None:
                options["weight"] = graph.get_attr(options["weight"])
            fused = graph.call_function(
                linear_cross_entropy_chain, (*_linear_operands(gm, node), target),
                {**options, "steps": chain.steps, "softcap": chain.softcap, "dtype": chain.dtype, "backend": backend})
        loss.replace_all_uses_with(fused)
        for dead in (loss, *reversed(chain.between), node):
            graph.erase_node(dead)
        through = "".join(f" -> {step_name(n)}" for n in chain.between)
        fusions.append(Fusion("linear_cross_entropy", f"{_describe_linear(gm, node)}{through} + {loss_name}",
                              "myext.linear_cross_entropy"))


def _classes(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    """The Linear's output features where the graph says: an nn.Linear's, or those of
    an F.linear's weight read from the model."""
    if node.op == "call_module":
        return gm.get_submodule(node.target).out_features
    (weight,) = call_args(node, ("weight",))
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return fx.graph_module._get_attr(gm, weight.target).shape[0]
    return None


def _replace_cross_entropy(gm: fx.GraphModule, backend: Optional[str], fusions: list[Fusion]) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = module_of(gm, node)
            if (isinstance(module, nn.CrossEntropyLoss) and not isinstance(module, myext_nn.CrossEntropyLoss)
                    and type(module).forward is nn.CrossEntropyLoss.forward):
                _set_submodule(gm, node.target, myext_nn.CrossEntropyLoss.from_torch(module, backend))
                fusions.append(Fusion("cross_entropy", f"{node.target} (nn.CrossEntropyLoss)",
                                      f"{node.target} (myext.nn.CrossEntropyLoss)"))
        elif node.op == "call_function" and (found := cross_entropy_options(gm, node)) is not None:
            input, target, arguments, name = found
            node.target = cross_entropy
            node.args = (input, target)
            node.kwargs = {**arguments, "backend": backend}
            fusions.append(Fusion("cross_entropy", name, "myext.cross_entropy"))


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    # GraphModule built its own containers on the way to each leaf, so this replaces
    # the leaf in the fused model only, never in the original.
    parent_name, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)
