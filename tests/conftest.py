"""Test set-up shared by every test file.

Without a GPU the Triton kernels run through Triton's interpreter, which must be
switched on before triton is first imported (importing torch does not import it).
"""

import os

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
