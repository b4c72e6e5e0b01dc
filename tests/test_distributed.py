"""Vocabulary-parallel losses and data-parallel training on process groups of 2 and 3
gloo processes (an uneven split of the classes), each case against the single-process
op on the whole tensors. The cases run in tests/distributed_worker.py, one process group
per suite and world size; each is reported here as a test of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_worker import CASES

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZES = (2, 3)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{(suite, world size): {case: errors}}, each suite run once per world size."""
    found = {}

    def get(suite: str, world_size: int) -> dict:
        key = (suite, world_size)
        if key not in found:
            out = tmp_path_factory.mktemp("distributed") / f"{suite}-{world_size}.json"
            run = subprocess.run([sys.executable, str(WORKER), suite, str(world_size), str(out)],
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"the worker failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            found[key] = json.loads(out.read_text())
        return found[key]

    return get


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("suite,name", [(suite, name) for suite, cases in CASES.items() for name in cases])
def test_case(results, suite, name, world_size):
    errors = results(suite, world_size)[name]
    assert not errors, "\n".join(errors)
