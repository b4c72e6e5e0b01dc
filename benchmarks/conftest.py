"""Shared set-up of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Every benchmark taking ``device`` and ``provider`` runs for each pair: each myext
backend that runs compiled kernels on the device (not the Triton interpreter, far too
slow to time), and the baselines ``eager`` and ``compile``. A benchmark sets ``benchmark.group`` to its op,
device, shape and pass, so each group of the report compares myext with both baselines.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from myext.bench import BASELINES, default_backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Runs each benchmark taking ``device`` and ``provider`` for every pair here:
    myext's compiled backends on the device, then the baselines."""
    if not {"device", "provider"} <= set(metafunc.fixturenames):
        return
    params = []
    for device in DEVICES:
        providers = [f"myext-{b}" for b in default_backends(torch.device(device))] + list(BASELINES)
        params += [pytest.param(device, p, id=f"{device}-{p}") for p in providers]
    metafunc.parametrize("device,provider", params)


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
    """``run_benchmark(call, device, group=..., rounds=None)`` times ``call()``.

    It calls it twice first, untimed: the first call of a compiled function compiles
    its forward and backward. On CUDA each timed call ends with a synchronize. With
    ``rounds`` it times exactly that many calls (for calls of seconds); otherwise
    pytest-benchmark calibrates the rounds itself.
    """

    def run(call: Callable[[], None], device: str, *, group: str, rounds: Optional[int] = None) -> None:
        benchmark.group = group
        if device == "cuda":
            def timed() -> None:
                call()
                torch.cuda.synchronize()
        else:
            timed = call
        for _ in range(2):
            timed()
        if rounds is None:
            benchmark(timed)
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1)

    return run
