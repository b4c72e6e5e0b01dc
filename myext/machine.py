"""What CPU this is and which paths myext's CPU kernels take on it, for ``myext check``,
``myext bench`` and benchmark records: timings mean little without them, since the
project's machines differ in CPU (an AMD EPYC or an Intel Xeon) from one run to the next.
"""

from __future__ import annotations

import platform
from typing import Any, NamedTuple

import torch

from . import _cpu

__all__ = ["GemmChoice", "cpu_description", "cpu_gemm_choices", "cpu_gemm_policy", "cpu_model", "describe_cpu",
           "set_cpu_gemm_policy"]


class GemmChoice(NamedTuple):
    """One shape class of GEMM ``a (rows, inner) @ b (inner, cols)`` that the CPU kernels
    measured on both libraries: its dtype (``"float32"``, ``"bfloat16"`` or ``"float16"``),
    ``rows`` up to ``rows_up_to`` (a power of two),
    the operands' layouts (``"r"`` row-major, ``"c"`` column-major, that is a transposed
    view, ``"s"`` other strides), each library's fastest timed call (oneDNN's ``inf`` where it
    has no kernel for the dtype on this CPU), the choice, and the ``(rows, inner, cols)`` the
    probe timed: the first call's own GEMM, or where that is over 2**30 multiply-adds (a
    large one would cost its first call seconds) a slice, each dimension above a cap cut to
    it, the largest cap that keeps the slice within 2**30."""

    dtype: str
    rows_up_to: int
    inner: int
    cols: int
    a_layout: str
    b_layout: str
    aten_seconds: float
    onednn_seconds: float
    onednn: bool
    timed_shape: tuple[int, int, int]


def cpu_gemm_policy() -> str:
    """Where the CPU kernels' GEMMs go: ``"probe"`` (the default: the first GEMM
    of each shape class times ATen's BLAS and oneDNN on its operands and keeps the faster
    for the process; in float32, bfloat16 and float16, those of a dtype that this CPU's
    oneDNN has no kernel for on ATen), ``"aten"`` or ``"onednn"`` (float32 on oneDNN,
    the rest on ATen). float64 always on ATen. Set by
    ``$MYEXT_CPU_GEMM`` or :func:`set_cpu_gemm_policy`; ``torch.backends.mkldnn.enabled =
    False`` keeps every GEMM on ATen whatever the policy."""
    return _cpu.kernels.gemm_policy()


def set_cpu_gemm_policy(policy: str) -> None:
    """Sets :func:`cpu_gemm_policy` for this process and forgets the choices measured
    so far (so ``"probe"`` measures afresh).

    Args:
        policy: ``"probe"``, ``"aten"`` or ``"onednn"``.
    """
    if policy not in _cpu.GEMM_POLICIES:
        raise ValueError(f"policy must be one of {list(_cpu.GEMM_POLICIES)}, got {policy!r}")
    _cpu.kernels.set_gemm_policy(policy)


def cpu_gemm_choices() -> list[GemmChoice]:
    """The shape classes measured so far in this process under the ``"probe"`` policy."""
    return [GemmChoice(*choice) for choice in _cpu.kernels.gemm_choices()]


def cpu_model() -> str:
    """The CPU's model name, vendor, family and model number as /proc/cpuinfo gives them
    (Linux; a VM may show a name as bare as "AMD EPYC"), else the machine type."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return (f"{fields['model name']} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')})")


def _gemm_path() -> str:
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if not onednn:
        return "ATen (no oneDNN in this torch)"
    if not torch.backends.mkldnn.enabled:
        return "ATen (oneDNN switched off: torch.backends.mkldnn.enabled = False)"
    policy = cpu_gemm_policy()
    if policy == "aten":
        return f"ATen (${_cpu.GEMM_ENV_VAR}=aten)"
    if policy == "onednn":
        return f"oneDNN for float32 (${_cpu.GEMM_ENV_VAR}=onednn), else ATen"
    path = "ATen or oneDNN, the faster measured per shape class and dtype"
    choices = cpu_gemm_choices()
    if not choices:
        return path
    return f"{path} ({sum(c.onednn for c in choices)} of the {len(choices)} measured so far on oneDNN)"


def describe_cpu() -> dict[str, Any]:
    """The CPU model, the vector ISA of the build of myext's CPU kernels in use and
    torch's own (both chosen at run time), the thread count and the CPU GEMM path."""
    return {
        "cpu": cpu_model(),
        "myext_cpu_capability": _cpu.CAPABILITY,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gemm": _gemm_path(),
    }


def cpu_description() -> str:
    """describe_cpu() on one line."""
    info = describe_cpu()
    return (f"{info['cpu']}, {info['threads']} threads; kernels {info['myext_cpu_capability']} "
            f"(torch {info['torch_cpu_capability']}); GEMMs: {info['gemm']}")
