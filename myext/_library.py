"""Registration of the Triton ops with the PyTorch dispatcher, for any op of the registry.

``register_triton_ops`` registers the host functions of an op's Triton module as
``myext::<name>_triton``, with the schema of ``myext::<name>`` (csrc/myext.cpp) and the
same fake kernel (see myext.registry.register).

The ops carry no autograd formulas of their own: each op's autograd Functions
differentiate them (a Python autograd kernel on an op would cost every call a trip
through Python, tens of microseconds at small sizes).
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, Mapping, Sequence

import torch

import myext_triton_ops

from ._batching import register_loop_vmap

TRITON_SUFFIX = "_triton"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def schema_of(qualified_name: str) -> str:
    """The schema of a registered op without its name: ``"(Tensor input, ...) -> Tensor"``."""
    namespace, name = qualified_name.split("::")
    schema = str(getattr(getattr(torch.ops, namespace), name).default._schema)
    return schema[len(qualified_name):]


def _traceable_schema(host, schema: str) -> bool:
    """Whether torch.library.triton_op would give ``host`` exactly ``schema``: it infers
    the schema from the annotations, which turns ``int`` into ``SymInt``, drops the
    lengths of lists and cannot express an optional return."""
    try:
        return torch.library.infer_schema(host, mutates_args=()) == schema
    except ValueError:
        return False


def register_triton_ops(names: Sequence[str], fakes: Mapping[str, Callable], module: ModuleType) -> None:
    """Registers ``module.<name>`` as ``myext::<name>_triton`` for each of ``names``, the
    dispatcher ops of one op, with the fake kernel ``fakes[name]``.

    On a GPU an op is a ``torch.library.triton_op``, whose kernels torch.compile sees,
    where triton_op gives it the schema of its C++ counterpart, and elsewhere a custom op
    that launches its kernels through ``wrap_triton``. Under ``TRITON_INTERPRET=1`` every
    op is a custom op that launches its kernels directly: triton_op traces its body with
    fake tensors, which the interpreter cannot run (they have no data).
    """
    for name in names:
        host = getattr(module, name)
        schema = schema_of(f"myext::{name}")
        qualified_name = f"myext::{name}{TRITON_SUFFIX}"
        if not myext_triton_ops.INTERPRETED and _traceable_schema(host, schema):
            torch.library.triton_op(qualified_name, host, mutates_args=())
        else:
            torch.library.custom_op(qualified_name, host, mutates_args=(), schema=schema)
        torch.library.register_fake(qualified_name, fakes[name])
        register_loop_vmap(qualified_name)
