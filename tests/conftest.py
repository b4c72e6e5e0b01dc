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


def backend_device_params(include_reference: bool = True) -> list:
    """(backend, device) pairs for every backend available on every device here;
    CUDA pairs carry the gpu mark."""
    params = []
    for device in DEVICES:
        for backend in myext.available_backends(device):
            if backend == "torch" and not include_reference:
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


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
