"""linear_cross_entropy against PyTorch: logits then loss (eager and compiled, and
compiled with Inductor's auto-chunker), F.linear_cross_entropy with and without its
chunked path, Apple's cut-cross-entropy where it is installed, and the GEMM floor.

Under pytest (``pytest benchmarks/ --benchmark-only``): the op's registered cases
(myext/ops/linear_cross_entropy.py) for myext, eager and compile, and in the same
groups PyTorch's own fused op and the three GEMMs alone. As a script, the comparison
docs/BENCHMARKS.md records, time and memory of one training step (forward and the
input and weight gradients) at a language model's head, myext also with every option a
language model's loop adds (per-token weights, normalizer, shift, temperature, the
log-probabilities and entropies returned), and the op's alternatives from its spec
(``compile-autochunk``: Inductor's auto-chunker, which the script reports as having
chunked the step or not; ``cut-cross-entropy``: its torch.compile implementation, skipped
with a line saying why where the package is missing)::

    python benchmarks/bench_linear_cross_entropy.py            # N=4096 H=1024 V=32000 float32
    python benchmarks/bench_linear_cross_entropy.py --dtype bfloat16
    python benchmarks/bench_linear_cross_entropy.py --only myext-cpp "myext-cpp, LM options" --rounds 12
    python benchmarks/bench_linear_cross_entropy.py --dtype bfloat16 --precision

Times: the providers called in turn, round after round (every other round in reverse
order), the median of each (ratios within one run are what compare). Memory: each
provider in a fresh process, one call after a warm-up, the growth of the resident set's
peak (VmHWM) less the gradients the call returns: what the step holds beyond its
results. The GEMM floor is the forward GEMM and the two gradient GEMMs into
preallocated outputs, the least any implementation that makes the logits must do; with
torch.mm (MKL on x86 CPUs), and through oneDNN, the GEMMs myext's cpp kernels run for
float32. Providers compiled with torch.compile are compiled in their warm-up call, outside
the times and the memory measured.

``--precision`` times nothing: it prints the error of the weight gradient of the same step
against float64 (of the same rounded inputs), for eager and for myext with each
``accum_dtype``, in three measures: relative in the Frobenius norm, the largest error
relative to the largest entry, and the largest error in units of the dtype's epsilon times
the sum of the magnitudes of the entry's terms (the scale of a GEMM's error bound; a GEMM
that sums in float32 and rounds once stays within about 1/2, its one rounding).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import myext
from myext import machine, registry
from myext.bench import inputs, peak_rss_bytes

OP = "linear_cross_entropy"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def test_linear_cross_entropy(run_case, case, device, provider):
    run_case(OP, case, device, provider)


def step(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor,
         target: torch.Tensor) -> Callable[[], None]:
    """One training step of the head: the loss, then its gradients for x and w."""

    def call() -> None:
        torch.autograd.grad(loss_fn(x, w, target), (x, w))

    return call


def gemm_floor(x: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    """The three GEMMs of the step (logits, input gradient, weight gradient) into
    preallocated outputs."""
    logits = x.new_empty(x.shape[0], w.shape[0])
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(w)

    def call() -> None:
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=grad_x)
        torch.mm(logits.t(), x, out=grad_w)

    return call


def onednn_gemm_floor(x: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    """The same three GEMMs through oneDNN, which myext's cpp kernels call for float32
    where it beats torch.mm (csrc/cpu/gemm.h): the floor of the library they use."""
    linear = torch.ops.mkldnn._linear_pointwise

    def call() -> None:
        logits = linear(x, w, None, "none", [], None)
        linear(logits, w.t(), None, "none", [], None)
        linear(logits.t(), x.t(), None, "none", [], None)

    return call


def with_lm_options(backend: str, target: torch.Tensor) -> Callable[..., torch.Tensor]:
    """myext's loss with every option a language model's loop adds: per-token weights,
    the exact normalizer (a tensor), shift 1, a temperature, and each token's
    log-probability and entropy returned (the loss differentiated, as a loop that logs
    them does)."""
    sample_weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)).to(torch.float32)
    normalizer = sample_weight[1:].sum()

    def loss(x, w, t):
        return myext.linear_cross_entropy(x, w, t, sample_weight=sample_weight, normalizer=normalizer, shift=1,
                                          temperature=0.7, return_logprob=True, return_entropy=True,
                                          backend=backend).loss

    return loss


def pytorch_fused(chunked: bool) -> Callable[..., torch.Tensor]:
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options)


def providers(backends: list[str], dtype: torch.dtype) -> tuple[dict[str, Callable[..., Callable[[], None]]],
                                                                dict[str, str]]:
    """Each provider by name, as a maker of its step from (x, w, target); PyTorch's
    fused op where this torch has it; myext summing the weight gradient in ``dtype``
    where that is a reduced one (``accum_dtype``, the least memory); and the op's
    alternatives that cannot run here, each with why."""
    eager = registry.get(OP).benchmark.eager
    makers = {f"myext-{b}": lambda x, w, t, b=b: step(functools.partial(myext.linear_cross_entropy, backend=b),
                                                        x, w, t)
              for b in backends}
    for b in backends:
        makers[f"myext-{b}, LM options"] = lambda x, w, t, b=b: step(with_lm_options(b, t), x, w, t)
        if dtype in (torch.bfloat16, torch.float16):
            makers[f"myext-{b}, accum_dtype={str(dtype).removeprefix('torch.')}"] = (
                lambda x, w, t, b=b: step(functools.partial(myext.linear_cross_entropy, backend=b, accum_dtype=dtype),
                                          x, w, t))
    makers["eager"] = lambda x, w, t: step(eager, x, w, t)
    makers["compile"] = lambda x, w, t: step(torch.compile(eager), x, w, t)
    if hasattr(F, "linear_cross_entropy"):
        makers["F.linear_cross_entropy"] = lambda x, w, t: step(pytorch_fused(chunked=False), x, w, t)
        makers["F.linear_cross_entropy chunked"] = lambda x, w, t: step(pytorch_fused(chunked=True), x, w, t)
    unavailable = {}
    for name, alternative in registry.get(OP).benchmark.alternatives.items():
        try:
            loss_fn = alternative.make()
        except registry.Unavailable as why:
            unavailable[name] = str(why)
            continue
        makers[name] = lambda x, w, t, loss_fn=loss_fn: step(loss_fn, x, w, t)
    makers["GEMM floor"] = lambda x, w, t: gemm_floor(x.detach(), w.detach())
    if torch.backends.mkldnn.is_available():
        makers["GEMM floor, oneDNN"] = lambda x, w, t: onednn_gemm_floor(x.detach(), w.detach())
    return makers, unavailable


@pytest.mark.parametrize("variant", ["F.linear_cross_entropy", "F.linear_cross_entropy chunked", "GEMM floor"])
@pytest.mark.parametrize("shape", registry.get(OP).benchmark.cases, ids=registry.get(OP).benchmark.label)
def test_pytorch_fused_and_gemm_floor(run_benchmark, variant, shape):
    if variant != "GEMM floor" and not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    tensors = inputs(OP, shape, device="cpu", dtype=torch.float32, requires_grad=True)
    x, w, target = tensors["input"], tensors["linear_weight"], tensors["target"]
    call = gemm_floor(x.detach(), w.detach()) if variant == "GEMM floor" else step(
        pytorch_fused(variant.endswith("chunked")), x, w, target)
    run_benchmark(call, "cpu", group=f"{OP} cpu {registry.get(OP).benchmark.label(shape)} fwd+bwd")


# --------------------------------------------------------------------------- the script

def _tensors(args: argparse.Namespace):
    torch.manual_seed(0)
    t = inputs(OP, dict(N=args.N, H=args.H, V=args.V), device="cpu", dtype=DTYPES[args.dtype], requires_grad=True)
    return t["input"], t["linear_weight"], t["target"]


def _memory_of_one(args: argparse.Namespace) -> None:
    """In a fresh process: one provider's peak resident growth during a step, less the
    gradients it returns, and how many graphs Inductor's auto-chunker chunked (in the
    warm-up call, which compiles), as JSON on stdout."""
    from torch._inductor import metrics

    # Compiled afresh, so that Inductor runs its passes and counts the chunker's work: a
    # cached graph, from the timing run, comes back chunked or not without a count.
    torch.compiler.config.force_disable_caches = True
    x, w, target = _tensors(args)
    backend = args.provider.removeprefix("myext-").split(",")[0]
    call = providers([backend], DTYPES[args.dtype])[0][args.provider](x, w, target)
    call()
    growth = peak_rss_bytes(call)
    if growth is None:
        raise SystemExit("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    gradients = (x.numel() + w.numel()) * x.element_size()
    print(json.dumps({"growth": growth, "beyond_gradients": growth - gradients,
                      "auto_chunked": metrics.num_auto_chunking}))


def _precision(args: argparse.Namespace) -> None:
    """The weight gradient's error against float64 (see the module's docstring)."""
    x, w, target = (t.detach() for t in _tensors(args))
    dtype = x.dtype
    # float64, by chunks of rows: the gradient and the sum of its terms' magnitudes.
    x64, w64 = x.double(), w.double()
    exact, magnitude = torch.zeros_like(w64), torch.zeros_like(w64)
    for begin in range(0, x.shape[0], 512):
        rows = slice(begin, begin + 512)
        d = torch.softmax(x64[rows] @ w64.t(), dim=1)
        d[torch.arange(d.shape[0]), target[rows]] -= 1
        exact += d.t() @ x64[rows]
        magnitude += d.abs().t() @ x64[rows].abs()
    exact, magnitude = exact / x.shape[0], magnitude / x.shape[0]
    eager = registry.get(OP).benchmark.eager
    steps = {"eager": eager, "rounded float64 (one rounding)": None,
             "myext-cpp": functools.partial(myext.linear_cross_entropy, backend="cpp")}
    if dtype != torch.float32:
        steps[f"myext-cpp, accum_dtype={args.dtype}"] = functools.partial(
            myext.linear_cross_entropy, backend="cpp", accum_dtype=dtype)
    print(f"linear_cross_entropy weight gradient, N={args.N} H={args.H} V={args.V} {args.dtype}, against float64; "
          f"torch {torch.__version__}, {machine.cpu_description()}")
    print(f"{'provider':36} {'Frobenius':>10} {'max/max|g|':>11} {'max/(eps sum|terms|)':>21}")
    eps = torch.finfo(dtype).eps
    for name, loss_fn in steps.items():
        if loss_fn is None:
            grad = exact.to(dtype)
        else:
            leaf = w.clone().requires_grad_()
            (grad,) = torch.autograd.grad(loss_fn(x, leaf, target), leaf)
        error = (grad.double() - exact).abs()
        print(f"{name:36} {(error.norm() / exact.norm()).item():10.3e} "
              f"{(error.max() / exact.abs().max()).item():11.2e} {(error / (eps * magnitude)).max().item():21.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--V", type=int, default=32000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="PROVIDER",
                        help="time these providers alone (names as the table prints them)")
    parser.add_argument("--precision", action="store_true",
                        help="print the weight gradient's error against float64 instead of timing")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.provider:
        return _memory_of_one(args)
    if args.precision:
        return _precision(args)

    x, w, target = _tensors(args)
    backends = [b for b in myext.available_backends("cpu") if b == "cpp"]
    makers, unavailable = providers(backends, DTYPES[args.dtype])
    for name, why in unavailable.items():
        print(f"{name} skipped, {why}")
    if args.only:
        unknown = set(args.only) - set(makers)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; known: {list(makers)}")
        makers = {name: make for name, make in makers.items() if name in args.only}
    calls = {name: make(x, w, target) for name, make in makers.items()}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round in range(args.rounds):
        # Every other round in reverse, so that no provider always follows the same one.
        for name, call in (reversed(calls.items()) if round % 2 else calls.items()):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}

    logits = args.N * args.V * DTYPES[args.dtype].itemsize
    print(f"linear_cross_entropy step, N={args.N} H={args.H} V={args.V} {args.dtype} (logits {logits / 1e6:.0f} MB), "
          f"torch {torch.__version__}, {machine.cpu_description()}")
    print(f"{'provider':32} {'median s':>9} {'vs myext':>9} {'vs floor':>9} {'peak growth':>12} {'beyond grads':>13}")
    ours = medians.get("myext-cpp")
    notes = []
    for name in calls:
        vs_ours = f"{medians[name] / ours:.2f}x" if ours else "-"
        memory = "            -             -"
        if not name.startswith("GEMM floor"):  # their outputs are preallocated, or not the step's
            measured = json.loads(subprocess.run(
                [sys.executable, __file__, "--N", str(args.N), "--H", str(args.H), "--V", str(args.V),
                 "--dtype", args.dtype, "--provider", name], check=True, capture_output=True, text=True).stdout)
            memory = f"{measured['growth'] / 1e6:9.0f} MB {measured['beyond_gradients'] / 1e6:10.0f} MB"
            if name == "compile-autochunk":  # the chunker gives up silently where it finds no pattern
                notes.append(f"{name}: Inductor's auto-chunker " + (
                    f"chunked {measured['auto_chunked']} graph(s)" if measured["auto_chunked"] else
                    "did not chunk the step: it ran as compile does"))
        floor = medians.get("GEMM floor")
        vs_floor = f"{medians[name] / floor:8.2f}x" if floor else "        -"
        print(f"{name:32} {medians[name]:9.3f} {vs_ours:>9} {vs_floor} {memory}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
