"""Loads the build of myext's CPU kernels for this CPU's vector ISA, which registers them.

setup.py compiles csrc/cpu once per ISA, ``myext._cpu_default``, ``_cpu_avx2`` and
``_cpu_avx512`` (x86-64; elsewhere the default build only), so that one build runs on any
CPU torch runs on. The ISA is torch's own choice for its kernels
(``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` lowers), or
a lower one named by ``MYEXT_CPU_CAPABILITY`` (``default``, ``avx2`` or ``avx512``); a
higher one than the CPU runs is refused, never an illegal instruction.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

__all__ = ["CAPABILITY", "ENV_VAR", "GEMM_ENV_VAR", "GEMM_POLICIES", "LEVELS", "kernels"]

ENV_VAR = "MYEXT_CPU_CAPABILITY"
GEMM_ENV_VAR = "MYEXT_CPU_GEMM"
GEMM_POLICIES = ("probe", "aten", "onednn")
# Lowest first.
LEVELS = ("default", "avx2", "avx512")


def _torch_level() -> str:
    capability = torch.backends.cpu.get_cpu_capability().lower()
    for level in reversed(LEVELS):
        if capability.startswith(level):
            return level
    return "default"


def _chosen_level() -> str:
    best = _torch_level()
    requested = os.environ.get(ENV_VAR)
    if not requested:
        return best
    if requested not in LEVELS:
        raise ImportError(f"${ENV_VAR} must be one of {list(LEVELS)}, got {requested!r}")
    if LEVELS.index(requested) > LEVELS.index(best):
        raise ImportError(f"${ENV_VAR}={requested}: this CPU runs at most {best} "
                          f"(torch.backends.cpu.get_cpu_capability() is {torch.backends.cpu.get_cpu_capability()!r})")
    return requested


def _load(level: str) -> ModuleType:
    """The build for ``level``, or the best lower one that was built."""
    for candidate in reversed(LEVELS[:LEVELS.index(level) + 1]):
        try:
            return importlib.import_module(f"myext._cpu_{candidate}")
        except ModuleNotFoundError:
            continue
    raise ImportError("no build of myext's CPU kernels (myext._cpu_*) was found; reinstall myext")


def _check_gemm_policy() -> None:
    # Read by the kernels at their first GEMM; refused here, where the error is clear.
    policy = os.environ.get(GEMM_ENV_VAR)
    if policy and policy not in GEMM_POLICIES:
        raise ImportError(f"${GEMM_ENV_VAR} must be one of {list(GEMM_POLICIES)}, got {policy!r}")


_check_gemm_policy()
# The build in use, and its ISA: "AVX512", "AVX2" or "DEFAULT".
kernels: ModuleType = _load(_chosen_level())
CAPABILITY: str = kernels.cpu_capability
