"""The op registry: one :class:`OpSpec` per op.

Each op's module (``myext/ops/<op>.py``) builds its spec and registers it. What works on
every op iterates the registry instead of naming ops: backend availability
(:mod:`myext.backends`), the Triton registrations, ``myext check``, ``myext bench``, the
``benchmarks/`` suite and the generic conformance tests. A new op gets all of them by
registering.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ._batching import register_loop_vmap

__all__ = ["Alternative", "Benchmark", "OpSpec", "Sample", "Unavailable", "get", "names", "register", "specs"]


@dataclasses.dataclass(frozen=True)
class Sample:
    """The arguments of one call. The tensors in ``args`` and ``kwargs`` that require
    grad are the differentiable inputs; everything else is held fixed."""

    args: tuple
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""


class Unavailable(Exception):
    """An alternative implementation cannot run here; the message says why and how to get it."""


@dataclasses.dataclass(frozen=True)
class Alternative:
    """Another library's implementation of an op, one a user might pick instead of myext's,
    timed as a baseline beside eager and compile.

    Attributes:
        make: returns the implementation, called with the op's benchmark inputs (as
            ``eager``); raises :class:`Unavailable` where it cannot run, such as an
            optional package not installed.
        compiled: whether it runs through torch.compile (``myext bench --no-compile``
            leaves those out: compiling dominates a short run).
    """

    make: Callable[[], Callable[..., torch.Tensor]]
    compiled: bool


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How ``myext bench`` and ``benchmarks/`` time an op.

    Attributes:
        sweep: the sizes timed: series of (label, shapes), each shape a dict of sizes.
        quick_sweep: tiny sizes of the same form, for smoke runs and tests.
        cases: the sizes of the pytest-benchmark suite in ``benchmarks/``.
        gpu_sweep: the sizes ``myext bench --device cuda`` times (GPUs want larger ones).
        x: the size a series sweeps (the x axis of its plot).
        inputs: ``inputs(**shape, device=, dtype=, requires_grad=)``: the op's positional
            arguments, in order, as a dict; for the backward, ``"grad_output"`` holds the
            upstream gradient (absent for a scalar output).
        eager: the same computation in plain PyTorch, the baseline (compiled too).
        work: ``work(shape, backward, dtype)``: (amount, unit) of one call, "GFLOP/s" for
            FLOPs or "GB/s" for the bytes an unfused implementation must move.
        label: a shape as the table shows it.
        alternatives: other implementations timed as baselines, by provider name.
    """

    sweep: Sequence[tuple[str, Sequence[Mapping[str, int]]]]
    quick_sweep: Sequence[tuple[str, Sequence[Mapping[str, int]]]]
    cases: Sequence[Mapping[str, int]]
    gpu_sweep: Sequence[tuple[str, Sequence[Mapping[str, int]]]]
    x: str
    inputs: Callable[..., dict[str, torch.Tensor]]
    eager: Callable[..., torch.Tensor]
    work: Callable[[Mapping[str, int], bool, torch.dtype], tuple[float, str]]
    label: Callable[[Mapping[str, int]], str]
    alternatives: Mapping[str, Alternative] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything the shared machinery knows of one op.

    Attributes:
        name: the op's name, ``myext.<name>`` its public function.
        function: the public function; takes the sample arguments and ``backend=``.
        reference: the plain-PyTorch spec, with the public function's arguments less
            ``backend``; autograd differentiates it to any order.
        baseline: what PyTorch's own functions compute for the same arguments
            (``F.cross_entropy``): the yardstick of the agreement checks, whose error
            in each dtype ours may exceed by about twice at most.
        dispatcher_ops: the ``myext::`` ops (schemas in csrc/myext.cpp) that forward and
            backward call; a compiled backend has the op when it has all of them.
        always_run: those of them that every differentiated call runs (``ops ran``
            checks them); None: all of them. (The fused linear cross-entropy's backward
            op runs only where forward could not compute the gradients.)
        fakes: a fake kernel for each dispatcher op, and for each op of ``capabilities``.
        samples: ``samples(device)``: small float64 calls for gradcheck, gradgradcheck,
            opcheck and the other conformance checks.
        accuracy_samples: ``accuracy_samples(device)``: larger float64 calls, cast to each
            dtype for agreement with the reference.
        benchmark: the sizes and work model for the benchmarks.
        backends: the backends that implement the op.
        capabilities: optional features, each with the dispatcher op that provides it; a
            backend has one where it has a kernel for that op.
    """

    name: str
    function: Callable[..., Any]
    reference: Callable[..., Any]
    baseline: Callable[..., Any]
    dispatcher_ops: tuple[str, ...]
    fakes: Mapping[str, Callable[..., Any]]
    samples: Callable[[str], list[Sample]]
    accuracy_samples: Callable[[str], list[Sample]]
    benchmark: Benchmark
    backends: tuple[str, ...] = ("cpp", "cuda", "triton", "torch")
    capabilities: Mapping[str, str] = dataclasses.field(default_factory=dict)
    always_run: Optional[tuple[str, ...]] = None

    def ops_always_run(self) -> tuple[str, ...]:
        """The dispatcher ops every differentiated call runs."""
        return self.dispatcher_ops if self.always_run is None else self.always_run


_SPECS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Adds ``spec`` to the registry and attaches its fake kernels to its ``myext::`` ops.

    Fake kernels give output shapes and dtypes without computing, so that torch.compile
    and torch.library.opcheck can trace the ops; the batching rules (myext._batching)
    let torch.func.vmap and the transforms built on it run them.
    """
    if spec.name in _SPECS:
        raise ValueError(f"an op named {spec.name!r} is already registered")
    missing = [op for op in (*spec.dispatcher_ops, *spec.capabilities.values()) if op not in spec.fakes]
    if missing:
        raise ValueError(f"op {spec.name!r} has no fake kernel for {missing}")
    for name, fake in spec.fakes.items():
        torch.library.register_fake(f"myext::{name}", fake)
        register_loop_vmap(f"myext::{name}")
    _SPECS[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    """The spec of the op ``name``; KeyError naming the registered ops otherwise."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered: {names()}") from None


def specs() -> tuple[OpSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_SPECS.values())


def names() -> list[str]:
    """The names of the registered ops, in registration order."""
    return list(_SPECS)

