"""``myext check``: the install's self-test.

For every registered op, on every backend and device available here, the battery of
myext.testing: gradcheck, gradgradcheck, opcheck of the dispatcher ops that ran and the
error against the plain-PyTorch reference in float64, then the reference agreement in
float32 and bfloat16 under the twice-PyTorch's-error rule.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any, NamedTuple, Optional

import torch

import myext

from .. import registry, testing
from ..backends import available_backends
from ..machine import cpu_description
from ._errors import CommandError

FLOAT64_CHECKS = ("gradcheck", "gradgradcheck", "opcheck", "vs reference")
LOW_PRECISION = (torch.float32, torch.bfloat16)


class Row(NamedTuple):
    op: str
    backend: str
    device: str
    dtype: str
    checks: str
    error: Optional[str]  # None when every check passed
    max_error: float


def _rows(results: list[testing.Result], op: str, backend: str, device: str) -> list[Row]:
    """One row per dtype: the checks that ran in it, the first failure, the largest error."""
    rows = []
    for dtype in dict.fromkeys(r.dtype for r in results):
        in_dtype = [r for r in results if r.dtype == dtype]
        failed = [r for r in in_dtype if not r.passed]
        errors = [r.max_error for r in in_dtype if r.max_error is not None and not math.isnan(r.max_error)]
        rows.append(Row(op, backend, device, dtype, ", ".join(dict.fromkeys(r.check for r in in_dtype)),
                        f"{failed[0].check} [{failed[0].sample}]: {failed[0].detail}" if failed else None,
                        max(errors) if errors and not failed else math.nan))
    return rows


def check_op(spec: registry.OpSpec, backend: str, device: str) -> list[Row]:
    """The self-test of one op on one backend and device: a row per dtype."""
    fn = functools.partial(spec.function, backend=backend)
    checks = [c for c in FLOAT64_CHECKS if c != "opcheck" or backend != "torch"]
    results = testing.check(fn, spec.reference, spec.samples(device), checks=checks, dtypes=())
    results += testing.check(fn, spec.reference, spec.accuracy_samples(device), checks=["vs reference"],
                             dtypes=LOW_PRECISION, baseline=spec.baseline)
    return _rows(results, spec.name, backend, device)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    plan = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device here")
        backends = available_backends(device)
        if args.backend:
            if args.backend not in backends:
                raise CommandError(f"backend {args.backend!r} is not available on {device} here "
                                   f"(available: {', '.join(backends)})")
            backends = [args.backend]
        plan += [(device, backend) for backend in backends]
    print(f"myext {myext.__version__}, torch {torch.__version__}; "
          + "; ".join(f"{d}: {', '.join(available_backends(d))}" for d in devices))
    print(f"cpu: {cpu_description()}")

    torch.manual_seed(0)
    rows = [row for device, backend in plan for spec in registry.specs()
            for row in check_op(spec, backend, device)]

    header = ("op", "backend", "device", "dtype", "checks", "result", "max error")
    table = [(r.op, r.backend, r.device, r.dtype, r.checks, "FAIL" if r.error else "ok",
              "-" if math.isnan(r.max_error) else f"{r.max_error:.1e}") for r in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())

    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\nFAIL {r.op} {r.backend} {r.device} {r.dtype}:\n  {r.error}")
    elapsed = time.perf_counter() - start
    if failed:
        print(f"\n{len(failed)} of {len(rows)} checks failed ({elapsed:.1f} s)")
        return 1
    print(f"\nall {len(rows)} checks passed ({elapsed:.1f} s)")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check", help="self-test every op on every available backend and device",
        description="The install's self-test: for each op, backend and device, gradcheck and gradgradcheck in "
                    "float64, torch.library.opcheck of the registered kernels, and the max error against the "
                    "plain-PyTorch reference in float64, float32 and bfloat16. Exits 1 on any failure. "
                    "Triton runs on the CPU only under TRITON_INTERPRET=1 (set before starting).")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="check only this device")
    parser.add_argument("--backend", help="check only this backend")
    parser.set_defaults(run=run)
