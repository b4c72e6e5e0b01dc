"""``myext bench``: times myext's ops against PyTorch eager and torch.compile.

For each registered op (myext.registry), pass (forward, forward+backward), size of its
sweep and provider (one per myext backend available on the device, plus ``eager`` and
``compile``, the same computation in plain PyTorch, and the other libraries' implementations
the op's spec names as alternatives, each left out with a line saying why where it cannot
run) it measures:

* the median (and the minimum) time of a call: on the CPU with ``time.perf_counter``,
  on CUDA with CUDA events. Providers are timed in turns, one call each per round,
  after warm-up, so that load from other processes falls on all of them alike and
  the ratios hold.
* the achieved rate, from the op's work model (its spec's ``benchmark.work``): GFLOP/s
  for GEMM-bound ops (linear_relu: 2NKM forward, 6NKM forward+backward), GB/s for
  memory-bound ones, counting the bytes an unfused implementation must move
  (cross_entropy: forward reads the logits and targets; backward reads them again and
  writes the gradient), the same for every provider.
* that rate as a percent of this machine's limit, measured at the start of the same
  run: the copy bandwidth of a large ``Tensor.copy_`` (bytes read + written) and the
  rate of a large matmul in the benchmark's dtype (the faster of ``torch.mm`` and, for
  float32 on the CPU, oneDNN, which myext itself uses). Both are measured again
  at the end, which shows how much the machine's load changed meanwhile.
* the peak memory a call needs beyond what existed before it, outputs included. On
  CUDA from ``torch.cuda.max_memory_allocated``. On the CPU two ways, as neither sees
  everything: the tensor bytes the CPU allocator hands out, from the allocation events
  of ``torch.profiler`` (``profile_memory=True``), which miss buffers a kernel gets
  from elsewhere (myext's large outputs come from ``aligned_alloc``, for huge pages);
  and on Linux the growth of the resident set (peak reset through
  ``/proc/self/clear_refs``), which sees every page touched but not memory that the C
  allocator reuses without returning it to the system (small buffers, below its
  32 MB mmap threshold). The larger of the two is the headline figure.
* the speed-up against each baseline: baseline time / provider time.

It prints a table, and optionally writes the results as JSON (``--json``) and one PNG
per op (``--plot-dir``; needs matplotlib). Run ``python -m myext.bench --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import myext
import myext_triton_ops

from . import machine, registry

OPS = tuple(registry.names())
PASSES = ("fwd", "fwd+bwd")
BASELINES = ("eager", "compile")
JSON_SCHEMA = "myext-bench/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Settings:
    """How long each case is timed."""

    warmup: int = 2  # calls before timing; the first call of a compiled function compiles it
    min_repeats: int = 5
    max_repeats: int = 30
    budget_s: float = 3.0  # time per case after which no round is started past min_repeats


QUICK_SETTINGS = Settings(warmup=1, min_repeats=3, max_repeats=5, budget_s=0.2)


# ---------------------------------------------------------------------------
# The computations: myext's and PyTorch's, each as a function of the op's inputs.

def op_impl(op: str, provider: str) -> Callable[..., torch.Tensor]:
    """The function that computes ``op`` for a provider: "eager", "compile", one of the op's
    alternatives (raising registry.Unavailable where it cannot run) or "myext-<backend>".

    "compile" gives a new ``torch.compile`` of the eager function. Dynamo caches compiled
    code per code object, for a few shapes only: call ``torch._dynamo.reset()`` before a
    new shape, else a long sweep silently falls back to eager.
    """
    spec = registry.get(op)
    if provider == "eager":
        return spec.benchmark.eager
    if provider == "compile":
        return torch.compile(spec.benchmark.eager)
    if provider in spec.benchmark.alternatives:
        return spec.benchmark.alternatives[provider].make()
    if not provider.startswith("myext-"):
        raise ValueError(f"unknown provider {provider!r}")
    return functools.partial(spec.function, backend=provider[len("myext-"):])


def op_providers(op: str, backends: Sequence[str], compiled: bool = True) -> list[str]:
    """The providers timed for ``op``: myext's backends, the baselines, and the op's
    alternatives that can run here; each one left out is named, with why, on stdout.
    ``compiled=False`` leaves out whatever runs through torch.compile."""
    alternatives = registry.get(op).benchmark.alternatives
    providers = [f"myext-{b}" for b in backends] + [p for p in BASELINES if compiled or p != "compile"]
    for name, alternative in alternatives.items():
        if alternative.compiled and not compiled:
            continue
        try:
            alternative.make()
        except registry.Unavailable as why:
            print(f"{op}: {name} skipped, {why}", flush=True)
            continue
        providers.append(name)
    return providers


def inputs(op: str, shape: Mapping[str, int], *, device: torch.device | str, dtype: torch.dtype,
           requires_grad: bool) -> dict[str, torch.Tensor]:
    """The arguments of one call of ``op`` at ``shape`` (see registry.Benchmark.inputs)."""
    return registry.get(op).benchmark.inputs(**shape, device=device, dtype=dtype, requires_grad=requires_grad)


def make_call(impl: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor],
              backward: bool) -> Callable[[], None]:
    """A call of one pass: ``impl`` of the arguments in ``tensors`` (in order; its
    ``"grad_output"``, if any, is the upstream gradient of the backward). It returns
    nothing: its outputs, the gradients included, are freed inside the call, so the
    timing includes freeing them too. Gradients come from ``torch.autograd.grad``, so
    nothing accumulates in ``.grad``."""
    args = [t for name, t in tensors.items() if name != "grad_output"]
    if not backward:
        def call() -> None:
            impl(*args)
        return call
    wrt = [t for t in args if t.requires_grad]
    grad_output = tensors.get("grad_output")

    def call() -> None:
        torch.autograd.grad(impl(*args), wrt, grad_output)
    return call


# ---------------------------------------------------------------------------
# Timing and memory.

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], None], device: torch.device) -> float:
    """Seconds one call takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    call()
    return time.perf_counter() - start_s


def time_providers(calls: dict[str, Callable[[], None]], device: torch.device,
                   settings: Settings) -> dict[str, list[float]]:
    """Times each call after warm-up, one call of each provider per round, so that
    a burst of load from elsewhere hits every provider rather than one."""
    for call in calls.values():
        for _ in range(settings.warmup):
            call()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for round_ in range(settings.max_repeats):
        for name, call in calls.items():
            times[name].append(time_call(call, device))
        if round_ + 1 >= settings.min_repeats and time.perf_counter() - start > settings.budget_s:
            break
    return times


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null: kineto writes two lines there each time a
    profiler starts and stops, and reads its log level only when torch is imported.
    Python exceptions still propagate; the call profiled has already run cleanly."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_alloc_bytes(call: Callable[[], None], device: torch.device) -> int:
    """The most tensor memory live at once during a call beyond what was allocated before
    it, as the device's allocator counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # Each "[memory]" event is one allocation (+bytes) or free (-bytes) by the CPU
    # allocator; their running sum in time order is the memory held beyond the start.
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # the kernel reports kB


def peak_rss_bytes(call: Callable[[], None]) -> Optional[int]:
    """How far the process's resident set grows during a call (Linux), or None where
    its peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident set
        before = _status_bytes("VmRSS")
    except (OSError, StopIteration):
        return None
    call()
    return max(0, _status_bytes("VmHWM") - before)


def peak_memory(call: Callable[[], None], device: torch.device) -> dict[str, Optional[int]]:
    """``peak_alloc_bytes``, ``peak_rss_bytes`` (CPU only) and the larger of the two as
    ``peak_extra_bytes``; each from a call of its own, so that the profiler's own
    memory stays out of the resident set measured."""
    rss = peak_rss_bytes(call) if device.type == "cpu" else None
    alloc = peak_alloc_bytes(call, device)
    return {"peak_extra_bytes": max(alloc, rss or 0), "peak_alloc_bytes": alloc, "peak_rss_bytes": rss}


# ---------------------------------------------------------------------------
# The machine's limits.

def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: touches the output's pages, loads the BLAS code
    _sync(device)
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def measure_limits(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, Any]:
    """The copy bandwidth (GB/s, bytes read + written by ``Tensor.copy_`` between two
    buffers far larger than the caches) and the matmul rate (GFLOP/s of a large square
    matmul in ``dtype``, the faster of ``torch.mm`` and, on the CPU, oneDNN's) of this
    device, as the ceilings for the ops' rates."""
    if device.type == "cuda":
        copy_bytes, n = (64 << 20, 2048) if quick else (1 << 30, 8192)
    else:
        copy_bytes, n = (64 << 20, 512) if quick else (512 << 20, 4096)
    matmul_GFLOPps, matmul_library = _matmul_GFLOPps(device, dtype, n)
    return {
        "copy_GBps": _copy_GBps(device, copy_bytes),
        "copy_bytes": copy_bytes,
        "matmul_GFLOPps": matmul_GFLOPps,
        "matmul_library": matmul_library,
        "matmul_size": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def _copy_GBps(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, repeats=5) / 1e9


def _matmul_GFLOPps(device: torch.device, dtype: torch.dtype, n: int) -> tuple[float, str]:
    """(GFLOP/s, which library): the faster of torch.mm and, for float32 on the CPU,
    oneDNN, which myext's cpp linear_relu uses where it beats torch.mm (MKL there)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    candidates = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        b_t = b.t()
        candidates["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], None)
    rates = {name: 2 * n**3 / _median_seconds(fn, device, repeats=5) / 1e9 for name, fn in candidates.items()}
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


# ---------------------------------------------------------------------------
# The sweep.

def work_per_call(op: str, shape: Mapping[str, int], backward: bool, dtype: torch.dtype) -> tuple[float, str]:
    """(amount, unit) of one call: FLOPs ("GFLOP/s") or bytes moved ("GB/s"), from the op's work model."""
    return registry.get(op).benchmark.work(shape, backward, dtype)


def default_backends(device: torch.device) -> list[str]:
    """The myext backends worth timing here: compiled kernels, not the plain-PyTorch
    reference, and not Triton under its (CPU) interpreter, which is orders slower."""
    return [b for b in myext.available_backends(device)
            if b != "torch" and not (b == "triton" and (myext_triton_ops.INTERPRETED or device.type != "cuda"))]


def run_case(op: str, series: str, shape: dict[str, int], backward: bool, providers: Sequence[str],
             device: torch.device, dtype: torch.dtype, limits: dict[str, Any],
             settings: Settings) -> list[dict[str, Any]]:
    """Times one size and pass of an op for every provider; one result row each."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # see op_impl: a fresh compile cache for each size
    tensors = inputs(op, shape, device=device, dtype=dtype, requires_grad=backward)
    calls = {p: make_call(op_impl(op, p), tensors, backward) for p in providers}
    times = time_providers(calls, device, settings)
    peaks = {p: peak_memory(call, device) for p, call in calls.items()}

    work, unit = work_per_call(op, shape, backward, dtype)
    limit = limits["matmul_GFLOPps"] if unit == "GFLOP/s" else limits["copy_GBps"]
    medians = {p: statistics.median(ts) for p, ts in times.items()}
    rows = []
    for p in providers:
        rate = work / medians[p] / 1e9
        rows.append({
            "op": op,
            "pass": "fwd+bwd" if backward else "fwd",
            "series": series,
            "shape": dict(shape),
            "label": registry.get(op).benchmark.label(shape),
            "x": shape[registry.get(op).benchmark.x],
            "provider": p,
            "median_ms": medians[p] * 1e3,
            "min_ms": min(times[p]) * 1e3,
            "times_ms": [t * 1e3 for t in times[p]],
            "unit": unit,
            "rate": rate,
            "percent_of_limit": 100.0 * rate / limit,
            **peaks[p],
            "speedup_vs_eager": medians["eager"] / medians[p] if "eager" in medians else None,
            "speedup_vs_compile": medians["compile"] / medians[p] if "compile" in medians else None,
        })
    return rows


TABLE_COLUMNS = [
    # (header, width, format of the row's value)
    ("op", 13, lambda r: r["op"]),
    ("pass", 7, lambda r: r["pass"]),
    ("shape", 16, lambda r: r["label"]),
    ("provider", 17, lambda r: r["provider"]),
    ("median ms", 10, lambda r: f"{r['median_ms']:.3f}"),
    ("min ms", 10, lambda r: f"{r['min_ms']:.3f}"),
    ("rate", 14, lambda r: f"{r['rate']:.1f} {r['unit']}"),
    ("% limit", 7, lambda r: f"{r['percent_of_limit']:.1f}"),
    ("peak alloc", 10, lambda r: format_bytes(r["peak_alloc_bytes"])),
    ("peak RSS", 9, lambda r: "-" if r["peak_rss_bytes"] is None else format_bytes(r["peak_rss_bytes"])),
    ("x eager", 7, lambda r: "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"),
    ("x compile", 9, lambda r: "-" if r["speedup_vs_compile"] is None else f"{r['speedup_vs_compile']:.2f}"),
]


def format_bytes(n: int) -> str:
    """Bytes in decimal units, e.g. "524.3 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_row(values: Iterable[str]) -> str:
    """One line of the table: the four label columns left-aligned, the figures right-aligned."""
    cells = [f"{v:<{w}}" if i < 4 else f"{v:>{w}}" for i, (v, (_, w, _)) in enumerate(zip(values, TABLE_COLUMNS))]
    return "  ".join(cells).rstrip()


def table_header() -> str:
    """The table's column titles and a rule under them."""
    header = format_row(h for h, _, _ in TABLE_COLUMNS)
    return header + "\n" + "-" * len(header)


def table_row(row: dict[str, Any]) -> str:
    """One result (a dict of the JSON's "results") as a line of the table."""
    return format_row(fmt(row) for _, _, fmt in TABLE_COLUMNS)


# ---------------------------------------------------------------------------
# Plots.

def _pyplot():
    """matplotlib's pyplot on a file-only backend, or SystemExit saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("myext bench: --plot-dir needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict[str, Any], plot_dir: str) -> list[str]:
    """One PNG per op: a panel per series and pass, x = the swept size, y = the achieved
    rate, one line per provider and a dashed line at the machine's limit."""
    plt = _pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for op in dict.fromkeys(r["op"] for r in results["results"]):
        rows = [r for r in results["results"] if r["op"] == op]
        panels = list(dict.fromkeys((r["series"], r["pass"]) for r in rows))
        series = list(dict.fromkeys(s for s, _ in panels))
        passes = list(dict.fromkeys(p for _, p in panels))
        fig, axes = plt.subplots(len(series), len(passes), squeeze=False,
                                 figsize=(5.5 * len(passes), 4 * len(series)))
        unit = rows[0]["unit"]
        limit = results["limits"]["matmul_GFLOPps" if unit == "GFLOP/s" else "copy_GBps"]
        for i, s in enumerate(series):
            for j, p in enumerate(passes):
                ax = axes[i][j]
                panel = [r for r in rows if r["series"] == s and r["pass"] == p]
                for provider in dict.fromkeys(r["provider"] for r in panel):
                    line = sorted((r["x"], r["rate"]) for r in panel if r["provider"] == provider)
                    ax.plot(*zip(*line), marker="o", label=provider)
                ax.axhline(limit, linestyle="--", color="gray",
                           label="matmul rate" if unit == "GFLOP/s" else "copy bandwidth")
                ax.set_xscale("log")
                sizes = sorted({r["x"] for r in panel})
                ax.set_xticks(sizes, [str(x) for x in sizes])
                ax.minorticks_off()
                ax.set_xlabel(registry.get(op).benchmark.x)
                ax.set_ylabel(unit)
                ax.set_title(f"{op} {s} {p}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize="small")
        fig.suptitle(f"{op}, {results['machine']['device_name']}, {results['dtype']}")
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{op}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Command line.

def describe_machine(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device, its name (on the CPU: the model, the ISA of
    myext's kernels and torch's, and the GEMM path), thread count and software versions."""
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "myext": myext.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        return info
    cpu = machine.describe_cpu()
    info["device_name"] = machine.cpu_description()
    info["cpu_capability"] = cpu["myext_cpu_capability"]
    info["torch_cpu_capability"] = cpu["torch_cpu_capability"]
    info["gemm"] = cpu["gemm"]
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``myext bench``."""
    parser.add_argument("--op", action="append", choices=OPS,
                        help="an op to time (repeatable; default: all)")
    parser.add_argument("--backend", action="append",
                        help="a myext backend to time (repeatable; default: the compiled backends "
                             "available on the device)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke test in seconds")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the providers that run through torch.compile, the compile baseline "
                             "among them (compiling takes most of a --quick run)")
    parser.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--plot-dir", metavar="DIR", help="write one PNG per op here (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Runs the sweep that ``args`` (from the parser of ``add_arguments``) asks for."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("myext bench: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    available = myext.available_backends(device)
    backends = args.backend or default_backends(device)
    unknown = [b for b in backends if b not in available]
    if unknown:
        print(f"myext bench: backend(s) {unknown} cannot run on {device.type} here; "
              f"available: {available}", file=sys.stderr)
        return 2
    if args.plot_dir:
        _pyplot()  # fail now, not after the sweep
    ops = args.op or list(OPS)
    settings = QUICK_SETTINGS if args.quick else Settings()

    machine = describe_machine(device)
    print(f"myext bench on {machine['device_name']}; torch {machine['torch']}; {str(dtype).removeprefix('torch.')}", flush=True)
    limits = measure_limits(device, dtype, args.quick)
    print(f"limits: copy {limits['copy_GBps']:.1f} GB/s, {limits['matmul_dtype']} matmul "
          f"{limits['matmul_GFLOPps']:.1f} GFLOP/s ({limits['matmul_size']}^3, {limits['matmul_library']})",
          flush=True)
    providers = {op: op_providers(op, backends, compiled=not args.no_compile) for op in ops}
    print(table_header(), flush=True)
    rows: list[dict[str, Any]] = []
    for op in ops:
        cases = registry.get(op).benchmark
        sweep = cases.quick_sweep if args.quick else cases.gpu_sweep if device.type == "cuda" else cases.sweep
        for series, shapes in sweep:
            for backward in (False, True):
                for shape in shapes:
                    for row in run_case(op, series, shape, backward, providers[op], device, dtype, limits, settings):
                        rows.append(row)
                        print(table_row(row), flush=True)

    # Measured again at the end: how far the machine's load drifted during the sweep.
    limits_end = measure_limits(device, dtype, args.quick)
    print(f"limits at the end: copy {limits_end['copy_GBps']:.1f} GB/s, "
          f"matmul {limits_end['matmul_GFLOPps']:.1f} GFLOP/s", flush=True)
    if device.type == "cpu":
        machine["gemm_end"] = describe_machine(device)["gemm"]
        machine["gemm_choices"] = [c._asdict() for c in myext.machine.cpu_gemm_choices()]
        print(f"GEMMs at the end: {machine['gemm_end']}", flush=True)
    results = {
        "schema": JSON_SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(args).items() if k not in ("run", "command")},
        "machine": machine,
        "dtype": str(dtype).removeprefix("torch."),
        "limits": limits,
        "limits_end": limits_end,
        # Every provider timed, in order (the alternatives belong to some ops only).
        "providers": list(dict.fromkeys(p for op in ops for p in providers[op])),
        "results": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot_dir:
        for path in write_plots(results, args.plot_dir):
            print(f"wrote {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``bench`` on the ``myext`` command's subparsers (see myext.cli); the
    parsed arguments carry ``run``, called as ``args.run(args)`` for the exit status."""
    parser = subparsers.add_parser("bench", help="time myext's ops against PyTorch eager and torch.compile",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m myext.bench [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="myext bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
