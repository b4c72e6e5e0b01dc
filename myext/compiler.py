"""``torch.compile(model, backend="myext")``: myext's fusions on the graphs dynamo captures.

The backend is registered under torch's ``torch_dynamo_backends`` entry point (see
pyproject.toml), so the name works once myext is installed, without an import. For each
graph dynamo captures (a model with graph breaks gives several), it rewrites

* each Linear whose output feeds only a ReLU into one :func:`myext.linear_relu`;
* each Linear whose logits reach only a cross-entropy, through the steps a language
  model puts between them (see :func:`myext._patterns.head_chain`), into one
  :func:`myext.linear_cross_entropy`: the logits are never made;

and hands the graph to Inductor with the ``mode`` and ``options`` given to
``torch.compile``. Logits that are used elsewhere too (returned, read by a metric) are
made as before, and the pair is left as it is, with the reason in the report.

What was fused and what was left is logged at INFO level to the ``myext.compiler``
logger and kept in :func:`reports`; :func:`explain` runs a model once and returns them.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import fx

from ._patterns import (call_args, cross_entropy_options, head_chain, linear_cross_entropy_chain, linear_kind,
                        relu_name, step_name)
from .functional import linear_relu
from .fuse import Fusion

__all__ = ["GraphReport", "backend", "explain", "reports", "reset"]

logger = logging.getLogger(__name__)

# The backend's own options; every other one is Inductor's, as torch.compile's options are.
_COMPILERS = ("inductor", "aot_eager", "eager")
_OWN_OPTIONS = {
    "compiler": "what compiles the rewritten graph: 'inductor' (the default), 'aot_eager' or 'eager'",
    "kernels": "the myext backend the fused ops run ('cpp', 'cuda', 'triton', 'torch'); default: the best "
               "for the inputs' device",
    "accum_dtype": "the fused heads' accum_dtype (myext.linear_cross_entropy's); default None",
}


class GraphReport(NamedTuple):
    """What the backend did to one captured graph.

    Attributes:
        fusions: the rewrites made (:class:`myext.fuse.Fusion`).
        left: each Linear that feeds a ReLU or a cross-entropy and was left as it is, with why.
    """

    fusions: tuple[Fusion, ...]
    left: tuple[str, ...]


_reports: list[GraphReport] = []


def reports() -> list[GraphReport]:
    """The report of each graph the backend has compiled in this process since :func:`reset`,
    in order (a copy)."""
    return list(_reports)


def reset() -> None:
    """Forgets the reports of :func:`reports`."""
    _reports.clear()


def backend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: Optional[str] = None,
            options: Optional[dict[str, Any]] = None) -> Callable[..., Any]:
    r"""The ``"myext"`` backend of ``torch.compile``: myext's fusions, then Inductor.

    Use it by name, ``torch.compile(model, backend="myext", mode=..., options=...)``. It
    rewrites each graph dynamo captures (see the module's docstring), then compiles it
    with Inductor, to which ``mode`` and every option but the backend's own go, as they
    would with ``backend="inductor"``.

    The backend's own options:

    * ``"compiler"``: ``"inductor"`` (the default), ``"aot_eager"`` or ``"eager"``: what
      compiles the rewritten graph (the last two to debug, or to see the fusions alone);
    * ``"kernels"``: the myext backend the fused ops run (``"cpp"``, ``"cuda"``,
      ``"triton"``, ``"torch"``); by default the best for the inputs' device;
    * ``"accum_dtype"``: the fused heads' ``accum_dtype`` (see
      :func:`myext.linear_cross_entropy`): a bfloat16 model's ``torch.bfloat16`` sums the
      head's weight gradient in the gradient itself, for the least memory.

    Raises:
        ValueError: for an option that neither the backend nor Inductor knows, or an
            Inductor option or mode with another compiler.
    """
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    kernels = options.pop("kernels", None)
    accum_dtype = options.pop("accum_dtype", None)
    if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
        raise ValueError(f"myext backend: option 'accum_dtype' must be a torch.dtype or None, got {accum_dtype!r}")
    if compiler not in _COMPILERS:
        raise ValueError(f"myext backend: option 'compiler' must be one of {_COMPILERS}, got {compiler!r}")
    if compiler != "inductor" and (options or mode not in (None, "default")):
        raise ValueError(f"myext backend: mode {mode!r} and options {sorted(options)} are Inductor's, and "
                         f"the compiler is {compiler!r}")
    inductor = None
    if compiler == "inductor":
        try:
            inductor = torch._TorchCompileInductorWrapper(mode, options, dynamic=None)
        except RuntimeError as err:
            own = "; ".join(f"{name!r}: {what}" for name, what in _OWN_OPTIONS.items())
            # Inductor's message lists its hundreds of options: the first sentence says it.
            raise ValueError(f"myext backend: {str(err).split(', known options')[0]}. The backend's own "
                             f"options are {own}; the rest are torch._inductor.config's.") from None

    report = rewrite(gm, kernels, accum_dtype)
    _reports.append(report)
    logger.info("myext backend: %d fusion(s)%s%s", len(report.fusions),
                "".join(f"\n  {f}" for f in report.fusions), "".join(f"\n  left: {why}" for why in report.left))

    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    return inductor(gm, example_inputs)


def explain(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[GraphReport]:
    """Runs ``fn(*args, **kwargs)`` once under ``torch.compile(backend="myext")`` with the
    rewritten graphs run eagerly, and returns the report of each graph it captured: what
    the backend fuses in ``fn`` and what it leaves, and why.

    Example::

        >>> [str(f) for r in myext.compiler.explain(model, x) for f in r.fusions]
        ['fc1 (F.linear) + torch.relu -> myext.linear_relu']
    """
    torch._dynamo.reset()
    start = len(_reports)
    try:
        torch.compile(fn, backend="myext", options={"compiler": "eager"})(*args, **kwargs)
        return _reports[start:]
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- the rewrite

def rewrite(gm: fx.GraphModule, kernels: Optional[str] = None,
            accum_dtype: Optional[torch.dtype] = None) -> GraphReport:
    """Rewrites the dynamo graph ``gm`` in place (see the module's docstring), the fused ops
    on the myext backend ``kernels`` and the heads with ``accum_dtype``; returns what it did."""
    graph = gm.graph
    fusions: list[Fusion] = []
    left: list[str] = []
    for node in list(graph.nodes):
        if node.graph is not graph or linear_kind(gm, node) != "function":
            continue
        x, weight, bias = call_args(node, ("input", "weight", "bias"))
        name = _describe(node)
        users = list(node.users)
        if len(users) == 1 and (how := relu_name(gm, users[0])) is not None and users[0].args[0] is node:
            with graph.inserting_before(users[0]):
                fused = graph.call_function(linear_relu, (x, weight, bias), {"backend": kernels})
            fused.meta.update(users[0].meta)
            users[0].replace_all_uses_with(fused)
            graph.erase_node(users[0])
            graph.erase_node(node)
            fusions.append(Fusion("linear_relu", f"{name} + {how}", "myext.linear_relu"))
            continue
        example = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
        chain = head_chain(node, example.shape[0] if isinstance(example, torch.Tensor) and example.dim() == 2 else None)
        if isinstance(chain, str):
            if (reached := _reaches_loss_or_relu(gm, node)) is not None:
                left.append(f"{name} + {reached}: {chain}")
            elif "leave the graph" in chain:
                left.append(f"{name}: {chain}")
            continue
        found = cross_entropy_options(gm, chain.loss)
        if found is None:
            left.append(f"{name} + {chain.loss.name}: a cross-entropy with the deprecated size_average or reduce")
            continue
        _, target, loss_options, loss_name = found
        with graph.inserting_before(chain.loss):
            fused = graph.call_function(
                linear_cross_entropy_chain, (x, weight, bias, target),
                {**loss_options, "steps": chain.steps, "softcap": chain.softcap, "dtype": chain.dtype,
                 "backend": kernels, "accum_dtype": accum_dtype})
        fused.meta.update(chain.loss.meta)
        chain.loss.replace_all_uses_with(fused)
        for dead in (chain.loss, *reversed(chain.between), node):
            graph.erase_node(dead)
        through = "".join(f" -> {step_name(n)}" for n in chain.between)
        fusions.append(Fusion("linear_cross_entropy", f"{name}{through} + {loss_name}", "myext.linear_cross_entropy"))
    graph.lint()
    gm.recompile()
    return GraphReport(tuple(fusions), tuple(left))


def _describe(node: fx.Node) -> str:
    """A Linear as the model names it: its module's path where dynamo recorded one."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        # dynamo names the path from where it found the module: L['self'].lm_head, G['head']
        path = list(stack.values())[-1][0]
        if (found := re.fullmatch(r"[LG]\['([^']*)'\](?:\.(.*))?", path)) is not None:
            path = found.group(2) or found.group(1)
        return f"{path or node.name} (nn.Linear)"
    return f"{node.name} (F.linear)"


def _reaches_loss_or_relu(gm: fx.GraphModule, linear: fx.Node, depth: int = 16) -> Optional[str]:
    """The name of a ReLU or cross-entropy the Linear's output feeds within ``depth``
    steps, else None: a Linear that feeds neither is not worth a line in the report."""
    seen, queue = {linear}, deque([(linear, 0)])
    while queue:
        node, d = queue.popleft()
        for user in node.users:
            if user in seen or d >= depth:
                continue
            seen.add(user)
            if relu_name(gm, user) is not None or cross_entropy_options(gm, user) is not None:
                return user.name
            queue.append((user, d + 1))
    return None


def _register_without_the_entry_point() -> None:
    # An installed myext names the backend through its entry point; a source tree on
    # PYTHONPATH (not installed) has none, and gets the name when this module is imported.
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "myext" not in list_backends(exclude_tags=()):
        register_backend(backend, name="myext")


_register_without_the_entry_point()
