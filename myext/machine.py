"""What CPU this is and which paths myext's CPU kernels take on it, for ``myext check``,
``myext bench`` and benchmark records: timings mean little without them, since the
project's machines differ in CPU (an AMD EPYC or an Intel Xeon) from one run to the next.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import _C, _cpu

__all__ = ["cpu_description", "cpu_model", "describe_cpu"]


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
    return f"oneDNN for float32 from {_C.onednn_min_flops / 1e6:g} MFLOP, else ATen"


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
