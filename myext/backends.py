"""Which kernels run: backend names, what is available where, and the default.

Backends:
  ``"cpp"``     the C++ CPU kernels in csrc/cpu (CPU tensors).
  ``"cuda"``    the CUDA kernels in csrc/cuda (CUDA tensors; needs a CUDA build of myext).
  ``"triton"``  the Triton kernels in triton_ops/ (CUDA tensors; CPU tensors only under
                ``TRITON_INTERPRET=1``).
  ``"torch"``   the plain-PyTorch reference in myext.reference: the executable spec.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch

from . import _C  # noqa: F401  (its kernels must be registered before they are probed)

BACKENDS = ("cpp", "cuda", "triton", "torch")
ENV_VAR = "MYEXT_BACKEND"
# Preference order for backend=None on each device type.
_DEFAULT_ORDER = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}


class Kernels(NamedTuple):
    """The dispatcher ops of one backend, each with the schema of its myext:: counterpart."""

    linear_relu: torch._ops.OpOverloadPacket
    linear_relu_backward: torch._ops.OpOverloadPacket
    cross_entropy_forward: torch._ops.OpOverloadPacket
    cross_entropy_backward: torch._ops.OpOverloadPacket


def _ops_with_suffix(suffix: str) -> Kernels:
    ns = torch.ops.myext
    return Kernels(*(getattr(ns, name + suffix) for name in Kernels._fields))


# Looked up once: an op lookup on torch.ops costs microseconds on every call.
_KERNELS = {"cpp": _ops_with_suffix(""), "cuda": _ops_with_suffix("")}


def kernels(backend: str) -> Kernels:
    """The registered ops behind a compiled backend ("cpp", "cuda" or "triton")."""
    if backend == "triton" and backend not in _KERNELS:
        probe_triton()
    return _KERNELS[backend]


# Facts of the installation, probed once. Plain module globals: torch.compile reads
# them as constants instead of tracing the probes.
_CUDA_KERNELS_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("myext::linear_relu", "CUDA")
_INPLACE_CROSS_ENTROPY_KEYS = frozenset(
    key for key in ("CPU", "CUDA")
    if torch._C._dispatch_has_kernel_for_dispatch_key("myext::cross_entropy_backward_", key))
_triton_ops_loaded: Optional[bool] = None


def probe_triton() -> bool:
    """Imports triton_ops (registering its ops) once; returns whether that worked.

    myext's import calls it where Triton can run (a CUDA device, or TRITON_INTERPRET=1),
    so that a compiled graph never has to trace the import.
    """
    global _triton_ops_loaded
    if _triton_ops_loaded is None:
        try:
            import triton_ops  # noqa: F401  (registers the myext::*_triton ops)

            _KERNELS["triton"] = _ops_with_suffix("_triton")
        except (ImportError, AttributeError):
            _triton_ops_loaded = False
        else:
            _triton_ops_loaded = True
    return _triton_ops_loaded


def _cuda_kernels_built() -> bool:
    return _CUDA_KERNELS_BUILT


def _triton_importable() -> bool:
    return _triton_ops_loaded if _triton_ops_loaded is not None else probe_triton()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda" and _cuda_kernels_built()
    if backend == "triton":
        runs_here = device_type == "cuda" or (device_type == "cpu" and _triton_interpreted())
        return runs_here and _triton_importable()
    return False


def available_backends(device: Optional[Union[str, torch.device]] = None) -> list[str]:
    """Lists the backends that can run here.

    Args:
        device: if given, only the backends that run on tensors of this device;
            otherwise those that run on the CPU or, where one is present, a CUDA device.

    Returns:
        Backend names, best first.

    Example::

        >>> myext.available_backends("cpu")
        ['cpp', 'torch']
    """
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    found: list[str] = []
    for device_type in device_types:
        for backend in _DEFAULT_ORDER.get(device_type, ("torch",)):
            if backend not in found and _available_on(backend, device_type):
                found.append(backend)
    return found


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend to run for tensors on ``device``: ``backend``, else $MYEXT_BACKEND,
    else the best one available. Raises ValueError if it is unknown or cannot run there."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if backend is None:
        order = _DEFAULT_ORDER.get(device.type, ("torch",))
        return next(name for name in order if _available_on(name, device.type))
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {backend!r}")
    if not _available_on(backend, device.type):
        raise ValueError(f"{source}={backend!r} cannot run on {device.type} tensors here; "
                         f"available for {device.type}: {available_backends(device)}"
                         + _why_unavailable(backend, device.type))
    return backend


def _why_unavailable(backend: str, device_type: str) -> str:
    if backend == "triton" and device_type == "cpu" and not _triton_interpreted():
        return " (Triton runs CPU tensors only under TRITON_INTERPRET=1, set before triton is imported)"
    if backend == "triton" and not _triton_importable():
        return " (triton or triton_ops cannot be imported)"
    if backend == "cuda" and device_type == "cuda":
        return " (myext was built without its CUDA kernels; rebuild with MYEXT_BUILD_CUDA=1)"
    return ""


def has_inplace_cross_entropy_backward(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` has a kernel that writes the cross-entropy gradient over the logits."""
    key = {"cpp": "CPU", "cuda": "CUDA"}.get(backend)
    return key is not None and device.type == key.lower() and key in _INPLACE_CROSS_ENTROPY_KEYS
