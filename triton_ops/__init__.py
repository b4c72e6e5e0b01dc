"""Triton kernels behind myext's ``backend="triton"``.

Importing this package registers the ops ``myext::linear_relu_triton``,
``myext::linear_relu_backward_triton``, ``myext::cross_entropy_forward_triton`` and
``myext::cross_entropy_backward_triton`` with the schemas of their ``myext::``
counterparts, and attaches the shared fake kernels and autograd formulas.

How an op is registered is fixed at import time (see define_op):

* on a GPU, with ``torch.library.triton_op``, whose kernels torch.compile sees,
  where triton_op can give the op its schema (of the four, linear_relu only), and
  elsewhere as a custom op launching its kernels through ``wrap_triton``;
* under ``TRITON_INTERPRET=1`` (CPU tensors), always as a custom op that launches
  its kernels directly: triton_op traces its body with fake tensors, which the
  interpreter cannot run (they have no data), and torch 2.11 refuses interpreted
  kernels in ``wrap_triton``.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

# Read as Triton reads it, so that the registration agrees with how kernels run.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETED:
    def wrap_triton(kernel):
        """The kernel itself, launched directly."""
        return kernel
else:
    # Eagerly it launches the kernel; traced (in a triton_op) it records it. Called
    # by name in the op bodies, which is how triton_op finds their kernels.
    from torch.library import wrap_triton  # noqa: F401  (used by the op modules)


def define_op(name: str, schema: str, *, traceable: bool = False) -> Callable:
    """Decorator registering a function as the op ``myext::<name>`` with ``schema`` (no name).

    A ``traceable`` op is a triton_op on a GPU, whose kernels torch.compile sees.
    triton_op infers the schema from the function's annotations, which turns ``int``
    into ``SymInt``, drops the names of returns and the lengths of lists, and cannot
    express an optional return: only an op whose annotations give ``schema`` exactly
    may be traceable (tests/test_triton.py compares the schemas).
    """
    qualified = f"myext::{name}"

    def register(fn: Callable) -> Callable:
        if traceable and not INTERPRETED:
            return torch.library.triton_op(qualified, fn, mutates_args=())
        return torch.library.custom_op(qualified, fn, mutates_args=(), schema=schema)

    return register


from myext import _library  # noqa: E402

from . import cross_entropy, linear_relu  # noqa: E402,F401  (define the ops)

_library.register("_triton")
