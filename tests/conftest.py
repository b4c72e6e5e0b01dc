"""Test set-up shared by every test file.

Without a GPU the Triton kernels run through Triton's interpreter, which must be
switched on before triton is first imported (importing torch does not import it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import myext  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    """A test taking ``backend`` and ``device``, in a module that names its ``OP``, runs for
    every backend of that op on every device here (CUDA ones carry the gpu mark); marked
    ``compiled_backends``, for all but the plain-PyTorch reference."""
    if not ({"backend", "device"} <= set(metafunc.fixturenames) and hasattr(metafunc.module, "OP")):
        return
    compiled_only = metafunc.definition.get_closest_marker("compiled_backends") is not None
    params = []
    for device in DEVICES:
        for backend in myext.available_backends(device, op=metafunc.module.OP):
            if compiled_only and backend == "torch":
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    metafunc.parametrize("backend,device", params)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _IsolatedCalls:
    """A worker process (tests/isolated_worker.py) that evaluates calls one at a time; one
    that dies takes only its own call with it, and the next call starts a new worker."""

    def __init__(self) -> None:
        self.process = None

    def _start(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        return subprocess.Popen([sys.executable, str(Path(__file__).with_name("isolated_worker.py"))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)

    def __call__(self, setup: str, code: str, backend: str, device: str) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        request = {"setup": setup, "code": code, "backend": backend, "device": device}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if line:
            return json.loads(line)
        returncode = self.process.wait(timeout=60)
        stderr = self.process.stderr.read()[-2000:]
        self.process = None
        return {"outcome": "crashed", "returncode": returncode, "message": stderr}

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture
def cpu_gemm_policy():
    """Sets myext.machine's CPU GEMM policy for one test (the measured choices are
    forgotten on the way in and out): ``cpu_gemm_policy("onednn")``."""
    from myext import machine

    before = machine.cpu_gemm_policy()
    yield machine.set_cpu_gemm_policy
    machine.set_cpu_gemm_policy(before)


@pytest.fixture(scope="session")
def isolated():
    """``isolated(setup, code, backend, device)`` runs the statements ``setup`` and then
    evaluates the expression ``code`` in another process, with ``torch``, ``ops`` (the
    backend's dispatcher ops, myext.backends.kernels) and ``dev`` in scope; returns
    {"outcome": "raised" | "returned" | "crashed" | "setup failed", ...}."""
    calls = _IsolatedCalls()
    yield calls
    calls.close()

