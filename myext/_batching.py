"""torch.func.vmap for the dispatcher ops: a batching rule that runs the op once per
batch element.

With it every ``myext::`` op works under ``vmap`` and everything built on it: the
autograd Functions' ``generate_vmap_rule``, ``jacrev`` and ``jacfwd`` (which vmap over
a backward or a jvp), ``torch.autograd.gradcheck(check_batched_grad=True)``. The
kernels see the shapes they always do; a batch of B costs B calls, which is what
those transforms are for (Jacobians, per-sample gradients of small problems), not the
training step. Ops that write into an argument get no rule: their callers take the
out-of-place op while a transform is active.
"""

from __future__ import annotations

from typing import Any

import torch


def register_loop_vmap(qualified_name: str) -> None:
    """Registers the per-element batching rule for the op ``qualified_name``
    (``"myext::name"``), unless it mutates an argument."""
    namespace, name = qualified_name.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    if overload._schema.is_mutable:
        return

    def rule(info: Any, in_dims: tuple, *args: Any):
        if info.batch_size == 0:  # no element to learn the outputs' shapes from
            raise NotImplementedError(f"{qualified_name} under vmap needs a batch of at least one element")
        results = []
        for index in range(info.batch_size):
            # in_dims holds an int for each batched tensor (None or a list of them otherwise).
            element = [arg.select(dim, index) if isinstance(dim, int) else arg for arg, dim in zip(args, in_dims)]
            results.append(overload(*element))
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        # Several outputs, of which the optional ones may be None in every element.
        stacked = tuple(None if out is None else torch.stack([r[i] for r in results])
                        for i, out in enumerate(results[0]))
        return stacked, tuple(None if out is None else 0 for out in stacked)

    torch.library.register_vmap(qualified_name, rule)


def is_legacy_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by torch's older vmap, which ``gradcheck``'s
    ``check_batched_grad`` and ``check_batched_forward_grad`` still use. That vmap
    runs no rule registered here, and batches an op by a loop of its own only where
    every output is a Tensor: the backward ops with optional gradients refuse it, so
    the Functions compute such a batch of gradients from torch ops. False while
    torch.compile traces (which cannot call the probe, and never sees such a batch)."""
    return not torch.compiler.is_compiling() and _is_legacy_batched(tensor)


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
