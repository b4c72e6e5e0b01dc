"""Shared set-up of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Every benchmark taking ``device`` and ``provider`` runs for each pair: each myext
backend that runs compiled kernels on the device (not the Triton interpreter, far too
slow to time), and the baselines ``eager`` and ``compile``. A benchmark module that
names its op (``OP = "<op>"``) and takes ``case`` also runs for each size of the op's
registered ``benchmark.cases`` and each pass (myext.registry). A benchmark sets its
group to its op, device, shape and pass, so each group of the report compares myext
with both baselines.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import pytest
import torch

from myext import registry
from myext.bench import BASELINES, PASSES, default_backends, inputs, make_call, op_impl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# A call slower than this is timed for a fixed few rounds instead of pytest-benchmark's calibration.
SLOW_CALL_S = 0.5
SLOW_ROUNDS = 3


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrizes ``device``/``provider`` over the pairs here and, in a module naming its
    ``OP``, ``case`` over that op's registered cases and passes."""
    if {"device", "provider"} <= set(metafunc.fixturenames):
        params = []
        for device in DEVICES:
            providers = [f"myext-{b}" for b in default_backends(torch.device(device))] + list(BASELINES)
            params += [pytest.param(device, p, id=f"{device}-{p}") for p in providers]
        metafunc.parametrize("device,provider", params)
    if "case" in metafunc.fixturenames:
        spec = registry.get(metafunc.module.OP)
        cases = [(dict(shape), pass_) for shape in spec.benchmark.cases for pass_ in PASSES]
        metafunc.parametrize("case", cases, ids=[f"{spec.benchmark.label(s)}-{p}" for s, p in cases])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the providers of one benchmark group back to back (pytest would run every
    shape of one provider first), so that a change in the machine's load between
    groups does not skew the ratios within one."""

    def group_of(item: pytest.Item) -> tuple:
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        params.pop("provider", None)
        return (str(item.path), getattr(item, "originalname", item.name), sorted(params.items(), key=str))

    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(repr(group_of(item)), index)
    items.sort(key=lambda item: first[repr(group_of(item))])


@pytest.fixture(autouse=True)
def _fresh_state():
    """A fixed seed, and an empty torch.compile cache: dynamo keeps compiled code per
    function for a few shapes only and would fall back to eager past them."""
    torch.manual_seed(0)
    torch._dynamo.reset()


@pytest.fixture
def run_benchmark(benchmark) -> Callable[..., None]:
    """``run_benchmark(call, device, group=...)`` times ``call()``.

    It calls it twice first, untimed: the first call of a compiled function compiles
    its forward and backward. On CUDA each timed call ends with a synchronize. A call
    that took over SLOW_CALL_S the second time is timed for SLOW_ROUNDS rounds;
    otherwise pytest-benchmark calibrates the rounds itself.
    """

    def run(call: Callable[[], None], device: str, *, group: str) -> None:
        benchmark.group = group
        if device == "cuda":
            def timed() -> None:
                call()
                torch.cuda.synchronize()
        else:
            timed = call
        timed()
        start = time.perf_counter()
        timed()
        if time.perf_counter() - start > SLOW_CALL_S:
            benchmark.pedantic(timed, rounds=SLOW_ROUNDS, iterations=1)
        else:
            benchmark(timed)

    return run


@pytest.fixture
def run_case(run_benchmark) -> Callable[..., None]:
    """``run_case(op, case, device, provider, dtype=torch.float32)`` times one registered
    case of ``op`` (a shape and a pass) for one provider."""

    def run(op: str, case: tuple[dict, str], device: str, provider: str, dtype: Optional[torch.dtype] = None) -> None:
        shape, pass_ = case
        backward = pass_ == "fwd+bwd"
        tensors = inputs(op, shape, device=device, dtype=dtype or torch.float32, requires_grad=backward)
        label = registry.get(op).benchmark.label(shape)
        run_benchmark(make_call(op_impl(op, provider), tensors, backward), device,
                      group=f"{op} {device} {label} {pass_}")

    return run
