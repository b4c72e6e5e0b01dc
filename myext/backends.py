"""Which kernels run: backend names, what is available where, and the default.

Backends:
  ``"cpp"``     the C++ CPU kernels in csrc/cpu (CPU tensors).
  ``"cuda"``    the CUDA kernels in csrc/cuda (CUDA tensors; needs a CUDA build of myext).
  ``"triton"``  the Triton kernels in triton_ops/, the package ``myext_triton_ops`` (CUDA
                tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
  ``"torch"``   each op's plain-PyTorch reference: the executable spec.

Availability is per op and backend: a compiled backend has an op where every one of
the op's dispatcher ops has a kernel for the device (see myext.registry).

Nothing is probed at import: the first question (an op's call, ``available_backends``)
surveys every op, backend and device type present, once, importing the Triton kernels
where Triton can run. torch.compile never traces the probes: it runs the functions that
answer (marked ``_run_while_tracing``) and takes their answers as constants, so a compiled
function may be the first to ask.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Union

import torch

import myext_triton_ops

from . import _C, _cpu  # noqa: F401  (their kernels must be registered before they are probed)
from . import registry
from ._library import TRITON_SUFFIX, register_triton_ops

BACKENDS = ("cpp", "cuda", "triton", "torch")
ENV_VAR = "MYEXT_BACKEND"
# Preference order for backend=None on each device type.
_DEFAULT_ORDER = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}
# The dispatcher ops of a compiled backend are myext::<name><suffix>.
_SUFFIX = {"cpp": "", "cuda": "", "triton": TRITON_SUFFIX}
# The dispatch key a C++ backend's kernels are registered under.
_DISPATCH_KEY = {"cpp": "CPU", "cuda": "CUDA"}
_DEVICE_TYPE = {"cpp": "cpu", "cuda": "cuda"}

# Looked up once: an op lookup on torch.ops costs microseconds on every call.
_OPS: dict[tuple[str, str], torch._ops.OpOverloadPacket] = {}


def op(name: str, backend: str) -> torch._ops.OpOverloadPacket:
    """The dispatcher op ``myext::<name>`` as implemented by ``backend`` ("cpp", "cuda" or "triton")."""
    key = (name, backend)
    found = _OPS.get(key)
    if found is None:
        if backend == "triton":
            probe_triton()
        found = getattr(torch.ops.myext, name + _SUFFIX[backend])
        # Not while dynamo traces: it refuses an autograd.Function whose backward writes
        # to module state, so a first call compiled would fail to trace.
        if not torch.compiler.is_compiling():
            _OPS[key] = found
    return found


def qualified_name(name: str, backend: str) -> str:
    """The qualified name of the dispatcher op ``myext::<name>`` as ``backend`` implements it."""
    return f"myext::{name}{_SUFFIX[backend]}"


class kernels:  # noqa: N801  (used like a function: kernels(backend).<op name>)
    """The dispatcher ops of one compiled backend, by name: ``kernels("triton").linear_relu``
    is ``torch.ops.myext.linear_relu_triton``."""

    def __init__(self, backend: str) -> None:
        if backend not in _SUFFIX:
            raise ValueError(f"backend {backend!r} has no dispatcher ops; compiled backends: {list(_SUFFIX)}")
        self._backend = backend

    def __getattr__(self, name: str) -> torch._ops.OpOverloadPacket:
        return op(name, self._backend)


# Facts of the installation, probed once, when first asked.
_surveyed = False
_triton_loaded: Optional[bool] = None
_triton_error = ""
_available: dict[tuple[str, str, str], bool] = {}
_capable: dict[tuple[str, str, str, str], bool] = {}
# resolve_backend's answers, looked up on every call of every op: derived from
# _available, which does not change in a process. Keyed on the torch.device itself,
# whose .type builds a new string on every read. _best: the default for (op, device);
# _resolved: an explicit (backend, device, op) once found to be valid.
_best: dict[tuple[Optional[str], torch.device], str] = {}
_resolved: set[tuple[str, torch.device, Optional[str]]] = set()


def _run_while_tracing(fn):
    """Marks a function that answers from the probes so that torch.compile calls it while
    tracing, as plain Python, and puts its answer in the graph as a constant: the probes
    import modules and register ops, which no graph can hold, and the caches they fill
    are then never read by traced code, so filling them breaks no guard. The mark is
    torch.compiler.assume_constant_result's, set here without importing torch._dynamo
    (which takes longer than the rest of myext's import); an eager call pays nothing
    for it. The answers may be constants: they do not change in a process."""
    fn._dynamo_marked_constant = True
    return fn


@_run_while_tracing
def probe_triton() -> bool:
    """Imports the Triton module of every registered op and registers its ops (and those
    of its capabilities that the module implements), once;
    returns whether that worked.

    The survey calls it where Triton can run (a CUDA device, or TRITON_INTERPRET=1).
    """
    global _triton_loaded, _triton_error
    if _triton_loaded is None:
        try:
            modules = [(spec, importlib.import_module(f"myext_triton_ops.{spec.name}"))
                       for spec in registry.specs() if "triton" in spec.backends]
        except ImportError as err:
            _triton_loaded, _triton_error = False, f"{type(err).__name__}: {err}"
        else:
            for spec, module in modules:
                optional = tuple(name for name in spec.capabilities.values() if hasattr(module, name))
                register_triton_ops(spec.dispatcher_ops + optional, spec.fakes, module)
            _triton_loaded = True
    return _triton_loaded


def _has_kernels(names: tuple[str, ...], backend: str, device_type: str) -> bool:
    if backend in _DISPATCH_KEY:
        return device_type == _DEVICE_TYPE[backend] and all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"myext::{name}", _DISPATCH_KEY[backend])
            for name in names)
    if backend == "triton":
        runs_here = device_type == "cuda" or (device_type == "cpu" and myext_triton_ops.INTERPRETED)
        return runs_here and probe_triton() and all(
            torch._C._dispatch_has_kernel(f"myext::{name}{TRITON_SUFFIX}") for name in names)
    return False


@_run_while_tracing
def available(op_name: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` runs the op ``op_name`` on tensors of ``device_type``."""
    key = (op_name, backend, device_type)
    found = _available.get(key)
    if found is None and _survey_once():
        found = _available.get(key)
    if found is None:  # not surveyed: another device type, or an op registered since
        spec = registry.get(op_name)
        if backend not in spec.backends:
            found = False
        elif backend == "torch":
            found = True
        else:
            found = _has_kernels(spec.dispatcher_ops, backend, device_type)
        _available[key] = found
    return found


@_run_while_tracing
def has_capability(op_name: str, capability: str, backend: str, device: torch.device) -> bool:
    """Whether ``backend`` has the optional feature ``capability`` of the op ``op_name``
    (one of its spec's ``capabilities``) on ``device``."""
    key = (op_name, capability, backend, device.type)
    found = _capable.get(key)
    if found is None and _survey_once():
        found = _capable.get(key)
    if found is None:
        provider = registry.get(op_name).capabilities.get(capability)
        found = _capable[key] = provider is not None and _has_kernels((provider,), backend, device.type)
    return found


def survey() -> None:
    """Fills the caches of ``available``, ``has_capability`` and the default backends
    for every registered op, backend and device type present. The first of them to miss
    its cache calls it (``_survey_once``), so that the probes run together, once."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for spec in registry.specs():
        for backend in BACKENDS:
            for device_type in device_types:
                available(spec.name, backend, device_type)
                for capability in spec.capabilities:
                    has_capability(spec.name, capability, backend, torch.device(device_type))
    # The devices tensors report: cpu without an index, each CUDA device with its own.
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        for name in [None, *registry.names()]:
            _best_backend(name, device)


def _survey_once() -> bool:
    """Runs the survey unless it ran; returns whether it ran now."""
    global _surveyed
    if _surveyed:
        return False
    _surveyed = True  # first: the survey's own questions call this again
    survey()
    return True


def _ops_for(op_name: Optional[str]) -> list[str]:
    return registry.names() if op_name is None else [registry.get(op_name).name]


def available_backends(device: Optional[Union[str, torch.device]] = None, op: Optional[str] = None) -> list[str]:
    """Lists the backends that can run here.

    Args:
        device: if given, only the backends that run on tensors of this device;
            otherwise those that run on the CPU or, where one is present, a CUDA device.
        op: if given, only the backends that run this op (e.g. ``"cross_entropy"``);
            otherwise those that run every op.

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
    ops = _ops_for(op)
    found: list[str] = []
    for device_type in device_types:
        for backend in _DEFAULT_ORDER.get(device_type, ("torch",)):
            if backend not in found and all(available(name, backend, device_type) for name in ops):
                found.append(backend)
    return found


def resolve_backend(backend: Optional[str], device: torch.device, op: Optional[str] = None) -> str:
    """The backend to run the op ``op`` (every op if None) on ``device``: ``backend``,
    else $MYEXT_BACKEND, else the best one available. Raises ValueError if it is unknown
    or cannot run there."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if backend is None:
        return _best_backend(op, device)
    key = (backend, device, op)
    if key in _resolved:
        return backend
    ops = _ops_for(op)
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {backend!r}")
    if not all(available(o, backend, device.type) for o in ops):
        what = f"{op} on " if op is not None else ""
        raise ValueError(f"{source}={backend!r} cannot run on {device.type} tensors here; "
                         f"available for {what}{device.type}: {available_backends(device, op)}"
                         + _why_unavailable(backend, device.type))
    if not torch.compiler.is_compiling():  # as in op(): no module state written while tracing
        _resolved.add(key)
    return backend


@_run_while_tracing
def _best_backend(op: Optional[str], device: torch.device) -> str:
    key = (op, device)
    best = _best.get(key)
    if best is None and _survey_once():
        best = _best.get(key)
    if best is None:
        order = _DEFAULT_ORDER.get(device.type, ("torch",))
        best = _best[key] = next(name for name in order
                                 if all(available(o, name, device.type) for o in _ops_for(op)))
    return best


def _why_unavailable(backend: str, device_type: str) -> str:
    if backend == "triton" and device_type == "cpu" and not myext_triton_ops.INTERPRETED:
        return " (Triton runs CPU tensors only under TRITON_INTERPRET=1, set before triton is imported)"
    if backend == "triton" and not probe_triton():
        return f" (the Triton kernels cannot be imported: {_triton_error})"
    if backend == "cuda" and device_type == "cuda":
        return " (myext was built without its CUDA kernels; rebuild with MYEXT_BUILD_CUDA=1)"
    return ""
