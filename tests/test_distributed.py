"""Vocabulary-parallel losses and data-parallel training on process groups of 2 and 3
gloo processes (an uneven split of the classes), and of 2 NCCL processes where two GPUs
are at hand, each case against the single-process op on the whole tensors. The cases
run in tests/distributed_worker.py, one process group per suite and group; each is
reported here as a test of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import CASES

WORKER = Path(__file__).with_name("distributed_worker.py")
GROUPS = [pytest.param(("gloo", 2), id="gloo-2"), pytest.param(("gloo", 3), id="gloo-3"),
          pytest.param(("nccl", 2), id="nccl-2", marks=[
              pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")])]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{(suite, group backend, world size): {case: errors}}, each suite run once per group."""
    found = {}

    def get(suite: str, group_backend: str, world_size: int) -> dict:
        key = (suite, group_backend, world_size)
        if key not in found:
            out = tmp_path_factory.mktemp("distributed") / f"{suite}-{group_backend}-{world_size}.json"
            run = subprocess.run([sys.executable, str(WORKER), suite, str(world_size), str(out), group_backend],
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"the worker failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            found[key] = json.loads(out.read_text())
        return found[key]

    return get


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("suite,name", [(suite, name) for suite, cases in CASES.items() for name in cases])
def test_case(results, suite, name, group):
    errors = results(suite, *group)[name]
    assert not errors, "\n".join(errors)
