"""The ``myext`` command.

``myext check``  the install's self-test: gradcheck, opcheck and accuracy against the
                 reference for every op on every backend and device available here.
``myext train``  trains the article's SimpleNet or MultiTaskNet with myext's fused ops and,
                 with the same seed and data order, its plain-PyTorch version; prints the
                 test accuracy and time per epoch of both.
``myext bench``  benchmarks (myext.bench).

Each subcommand is one function decorated with :func:`subcommand` that adds its parser
to the subparsers and sets ``run`` to the function that carries it out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

import myext

from . import bench
from ._validation import REDUCTIONS
from .backends import available_backends, kernels, resolve_backend
from .data import ImageData, load_digits_dataset, load_mnist_dataset, read_idx
from .models import MultiTaskNet, SimpleNet, multitask_loss
from .nn import CrossEntropyLoss

__all__ = ["main", "read_idx", "subcommand"]

_SUBCOMMANDS: list[Callable[[Any], None]] = []


class CommandError(Exception):
    """A problem with the command line or its inputs: printed without a traceback, exit code 2."""


def subcommand(add_parser: Callable[[Any], None]) -> Callable[[Any], None]:
    """Registers a function that adds one subcommand to the ``myext`` command.

    The function receives argparse's subparsers object, adds its parser to it, and
    sets the parser's default ``run`` to a callable taking the parsed arguments and
    returning the exit code.
    """
    _SUBCOMMANDS.append(add_parser)
    return add_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="myext", description="myext's command line: self-test, training demo, benchmarks.")
    parser.add_argument("--version", action="version", version=f"myext {myext.__version__} (torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``myext`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as err:
        print(f"myext {args.command}: error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- check

class _Row(NamedTuple):
    op: str
    backend: str
    device: str
    dtype: str
    checks: str
    error: Optional[str]  # None when every check passed
    max_error: float


# Elementwise |value - reference| <= atol + rtol |reference|, the reference computed in float64.
# float32: sums of a few dozen products; bfloat16: 8 bits of mantissa.
_TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-2, 4e-2)}


def _linear_relu_inputs(dtype: torch.dtype, device: str, shape: tuple[int, ...], out_features: int):
    x = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(out_features, shape[-1], dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(out_features, dtype=torch.float64).to(device=device, dtype=dtype)
    return [t.requires_grad_() for t in (x, w, b)], {}


def _cross_entropy_inputs(dtype: torch.dtype, device: str, rows: int, classes: int):
    logits = torch.randn(rows, classes, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), device=device)
    target[0] = -1
    weight = torch.rand(classes, dtype=torch.float64).add_(0.5).to(device=device, dtype=dtype)
    return [logits], dict(target=target, weight=weight, ignore_index=-1, label_smoothing=0.1)


def _cross_entropy_probability_inputs(dtype: torch.dtype, device: str, rows: int, classes: int):
    logits = torch.randn(rows, classes, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(device=device, dtype=dtype)
    return [logits, target.requires_grad_()], dict(reduction="sum")


def _op_fn(op: str, backend: str, kwargs: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The op on one backend as a function of its differentiable inputs only, the rest
    fixed from ``kwargs``: class-index targets come from there, probability targets are inputs."""
    if op == "linear_relu":
        return lambda x, w, b: myext.linear_relu(x, w, b, backend=backend)
    if "target" in kwargs:
        fixed = {k: v for k, v in kwargs.items() if k != "target"}
        return lambda logits: myext.cross_entropy(logits, kwargs["target"], **fixed, backend=backend)
    return lambda logits, target: myext.cross_entropy(logits, target, **kwargs, backend=backend)


def _error_vs_reference(op: str, backend: str, inputs: list[torch.Tensor], kwargs: dict[str, Any],
                        dtype: torch.dtype) -> tuple[float, bool]:
    """Max abs error of the output and every input gradient against the reference in float64,
    and whether every element is within the dtype's tolerance."""
    out = _op_fn(op, backend, kwargs)(*inputs)
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    ref_out = _op_fn(op, "torch", ref_kwargs)(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)

    rtol, atol = _TOLERANCES[dtype]
    max_error, within = 0.0, True
    for value, ref in zip((out, *grads), (ref_out, *ref_grads)):
        diff = (value.double() - ref).abs()
        if diff.numel():
            max_error = max(max_error, diff.max().item())
            within = within and bool((diff <= atol + rtol * ref.abs()).all())
    return max_error, within


def _opcheck(op: str, backend: str, inputs: list[torch.Tensor], kwargs: dict[str, Any]) -> None:
    """opcheck of the registered kernels behind ``op`` (forward and backward ops).

    The ops are differentiated by myext.autograd's Functions, not on their own, so
    they are checked with inputs that do not require grad.
    """
    ops = kernels(backend)
    inputs = [t.detach() for t in inputs]
    if op == "linear_relu":
        x, w, b = inputs
        torch.library.opcheck(ops.linear_relu, (x, w, b))
        output = ops.linear_relu(x, w, b)
        torch.library.opcheck(ops.linear_relu_backward, (torch.randn_like(output), x, w, output, [True, True, True]))
        return
    logits = inputs[0]
    target = kwargs["target"].detach() if "target" in kwargs else inputs[-1]
    weight = kwargs.get("weight")
    reduction = REDUCTIONS[kwargs.get("reduction", "mean")]
    options = (reduction, kwargs.get("ignore_index", -100), kwargs.get("label_smoothing", 0.0))
    torch.library.opcheck(ops.cross_entropy_forward, (logits, target, weight, *options))
    loss, lse, total_weight = ops.cross_entropy_forward(logits, target, weight, *options)
    torch.library.opcheck(ops.cross_entropy_backward,
                          (torch.ones_like(loss), logits, target, weight, lse, total_weight, *options))


_CHECK_CASES = {
    "linear_relu": [lambda dtype, device: _linear_relu_inputs(dtype, device, (2, 3, 5), 4)],
    "cross_entropy": [lambda dtype, device: _cross_entropy_inputs(dtype, device, 6, 5),
                      lambda dtype, device: _cross_entropy_probability_inputs(dtype, device, 4, 3)],
}
_ACCURACY_CASES = {
    "linear_relu": lambda dtype, device: _linear_relu_inputs(dtype, device, (32, 64), 48),
    "cross_entropy": lambda dtype, device: _cross_entropy_inputs(dtype, device, 64, 100),
}


def _check_float64(op: str, backend: str, device: str) -> _Row:
    checks = ["gradcheck", "gradgradcheck"] + (["opcheck"] if backend != "torch" else []) + ["vs reference"]
    max_error = 0.0
    try:
        for make in _CHECK_CASES[op]:
            inputs, kwargs = make(torch.float64, device)
            fn = _op_fn(op, backend, kwargs)
            torch.autograd.gradcheck(fn, inputs)
            torch.autograd.gradgradcheck(fn, inputs)
            if backend != "torch":
                _opcheck(op, backend, inputs, kwargs)
            error, within = _error_vs_reference(op, backend, inputs, kwargs, torch.float64)
            max_error = max(max_error, error)
            if not within:
                raise AssertionError(f"max error {error:.2e} vs the reference exceeds the float64 tolerance")
    except Exception as err:  # a self-test reports every failure and goes on
        return _Row(op, backend, device, "float64", ", ".join(checks), f"{type(err).__name__}: {err}", math.nan)
    return _Row(op, backend, device, "float64", ", ".join(checks), None, max_error)


def _check_accuracy(op: str, backend: str, device: str, dtype: torch.dtype) -> _Row:
    dtype_name = str(dtype).replace("torch.", "")
    try:
        inputs, kwargs = _ACCURACY_CASES[op](dtype, device)
        max_error, within = _error_vs_reference(op, backend, inputs, kwargs, dtype)
    except Exception as err:  # a self-test reports every failure and goes on
        return _Row(op, backend, device, dtype_name, "vs reference", f"{type(err).__name__}: {err}", math.nan)
    rtol, atol = _TOLERANCES[dtype]
    error = None if within else f"error above the tolerance (rtol {rtol:g}, atol {atol:g})"
    return _Row(op, backend, device, dtype_name, "vs reference", error, max_error)


def _run_check(args: argparse.Namespace) -> int:
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

    torch.manual_seed(0)
    rows = []
    for device, backend in plan:
        for op in _CHECK_CASES:
            rows.append(_check_float64(op, backend, device))
            rows += [_check_accuracy(op, backend, device, dtype) for dtype in (torch.float32, torch.bfloat16)]

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


@subcommand
def add_check_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check", help="self-test every op on every available backend and device",
        description="The install's self-test: for each op, backend and device, gradcheck and gradgradcheck in "
                    "float64, torch.library.opcheck of the registered kernels, and the max error against the "
                    "plain-PyTorch reference in float64, float32 and bfloat16. Exits 1 on any failure. "
                    "Triton runs on the CPU only under TRITON_INTERPRET=1 (set before starting).")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="check only this device")
    parser.add_argument("--backend", help="check only this backend")
    parser.set_defaults(run=_run_check)


# --------------------------------------------------------------------------- train

class _TorchSimpleNet(nn.Module):
    """The article's SimpleNet in plain PyTorch: the baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class _TorchMultiTaskNet(nn.Module):
    """The article's MultiTaskNet in plain PyTorch, with head sizes as arguments: the baseline."""

    def __init__(self, num_classes1: int, num_classes2: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, num_classes1)
        self.fc3 = nn.Linear(128, num_classes2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x), self.fc3(x)


class _Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal; elsewhere
    (pipes, logs) one line per epoch."""

    def __init__(self, label: str, epoch: int, epochs: int, total: int, width: int = 24) -> None:
        self.prefix = f"{label} epoch {epoch:>{len(str(epochs))}}/{epochs}"
        self.total, self.width = total, width
        self.interactive = sys.stderr.isatty()
        self.last_draw = 0.0

    def update(self, done: int, loss: Callable[[], float], elapsed: float) -> None:
        final = done == self.total
        now = time.perf_counter()
        if not final and (not self.interactive or now - self.last_draw < 0.1):
            return
        self.last_draw = now
        filled = self.width * done // self.total
        line = (f"{self.prefix} |{'#' * filled}{' ' * (self.width - filled)}| {done}/{self.total} "
                f"loss {loss():.4f} {elapsed:.2f}s")
        sys.stderr.write(("\r" + line) if self.interactive else line)
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


class _Result(NamedTuple):
    test_accuracy: float
    head_accuracy: Optional[list[float]]
    epoch_seconds: list[float]
    train_loss: float

    @property
    def seconds_per_epoch(self) -> float:
        # The median: one-off costs of the first epoch (compilation, warm-up) and a busy
        # machine's outliers do not stand for the steady rate.
        return statistics.median(self.epoch_seconds)


def _train_and_test(label: str, model: nn.Module, loss_fn: Callable, data: ImageData, args: argparse.Namespace,
                    device: torch.device) -> _Result:
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    runner = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # One generator per run, seeded alike: both models see the batches in the same order.
    order = torch.Generator().manual_seed(args.seed)
    count = len(train_y)
    batches = math.ceil(count / args.batch_size)
    epoch_seconds, loss_sum = [], torch.zeros((), device=device)
    for epoch in range(1, args.epochs + 1):
        model.train()
        permutation = torch.randperm(count, generator=order).to(device)
        progress = _Progress(label, epoch, args.epochs, batches)
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        for batch in range(batches):
            index = permutation[batch * args.batch_size:(batch + 1) * args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(runner(train_x[index]), train_y[index])
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            progress.update(batch + 1, lambda: loss_sum.item() / (batch + 1), time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)

    model.eval()
    with torch.no_grad():
        outputs = runner(data.test_images.to(device))
    test_y = data.test_labels.to(device)
    if isinstance(outputs, torch.Tensor):
        accuracy = (outputs.argmax(1) == test_y).float().mean().item()
        heads = None
    else:
        correct = [out.argmax(1) == test_y[:, i] for i, out in enumerate(outputs)]
        heads = [c.float().mean().item() for c in correct]
        # A sample counts as right when every head is right.
        accuracy = torch.stack(correct).all(0).float().mean().item()
    return _Result(accuracy, heads, epoch_seconds, loss_sum.item() / batches)


def _with_parity(data: ImageData) -> ImageData:
    """Labels (N, 2): the digit, and its parity (0 even, 1 odd), the second task."""
    return data._replace(train_labels=torch.stack([data.train_labels, data.train_labels % 2], 1),
                         test_labels=torch.stack([data.test_labels, data.test_labels % 2], 1))


def _limited(data: ImageData, limit: Optional[int]) -> ImageData:
    if limit is None:
        return data
    return data._replace(train_images=data.train_images[:limit], train_labels=data.train_labels[:limit],
                         test_images=data.test_images[:limit], test_labels=data.test_labels[:limit])


def _validated_device_and_backend(args: argparse.Namespace) -> tuple[torch.device, str]:
    for name in ("epochs", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise CommandError(f"--lr must be positive, got {args.lr}")
    try:
        device = torch.device(args.device)
        backend = resolve_backend(args.backend, device)
    except (RuntimeError, ValueError) as err:
        raise CommandError(str(err)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device here")
    return device, backend


def _load_data(args: argparse.Namespace) -> ImageData:
    try:
        if args.data == "mnist":
            if args.data_dir is None:
                raise CommandError("--data mnist needs --data-dir DIR holding the MNIST IDX files")
            data = load_mnist_dataset(args.data_dir)
        else:
            data = load_digits_dataset()
    except (OSError, ValueError, ImportError) as err:
        raise CommandError(str(err)) from None
    data = _limited(data, args.limit)
    return _with_parity(data) if args.model == "multitask" else data


def _models_and_losses(args: argparse.Namespace) -> tuple[nn.Module, Callable, nn.Module, Callable]:
    """(myext model, its loss, plain-PyTorch model, its loss), both models with the same initial weights."""
    torch.manual_seed(args.seed)
    if args.model == "multitask":
        plain: nn.Module = _TorchMultiTaskNet(10, 2)
        fused: nn.Module = MultiTaskNet(10, 2, backend=args.backend)
        torch_ce = nn.CrossEntropyLoss()

        def plain_loss(outputs, labels):
            return torch_ce(outputs[0], labels[:, 0]) + torch_ce(outputs[1], labels[:, 1])

        def fused_loss(outputs, labels):
            return multitask_loss(outputs, labels.unbind(1), backend=args.backend)
    else:
        plain, fused = _TorchSimpleNet(), SimpleNet(backend=args.backend)
        plain_loss, fused_loss = nn.CrossEntropyLoss(), CrossEntropyLoss(backend=args.backend)
    # Same initial weights for both, whatever each constructor draws.
    fused.load_state_dict(plain.state_dict())
    return fused, fused_loss, plain, plain_loss


def _print_results(results: dict[str, _Result], backend: str) -> None:
    multitask = results["myext"].head_accuracy is not None
    labels = {"myext": f"myext (fused, backend {backend})", "torch": "torch (nn.Linear + nn.CrossEntropyLoss)"}
    width = max(map(len, labels.values()))
    print(f"{'':{width}}  test accuracy  s/epoch" + ("  head accuracy" if multitask else ""))
    for key, result in results.items():
        heads = ("  " + " / ".join(f"{a:.2%}" for a in result.head_accuracy)) if multitask else ""
        print(f"{labels[key]:{width}}  {result.test_accuracy:13.2%}  {result.seconds_per_epoch:7.3f}{heads}")
    gap = 100 * (results["myext"].test_accuracy - results["torch"].test_accuracy)
    print(f"myext - torch: {gap:+.2f} accuracy points, "
          f"{results['myext'].seconds_per_epoch / results['torch'].seconds_per_epoch:.2f}x the time per epoch"
          + (" (multi-task accuracy: both heads right)" if multitask else ""))


def _write_metrics(path: Path, results: dict[str, _Result], config: dict[str, Any]) -> None:
    metrics: dict[str, Any] = {}
    for key, result in results.items():
        metrics[key] = {"test_accuracy": result.test_accuracy, "seconds_per_epoch": result.seconds_per_epoch,
                        "epoch_seconds": result.epoch_seconds, "train_loss": result.train_loss}
        if result.head_accuracy is not None:
            metrics[key]["head_accuracy"] = result.head_accuracy
    metrics["config"] = config
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def _run_train(args: argparse.Namespace) -> int:
    device, backend = _validated_device_and_backend(args)
    data = _load_data(args)
    fused, fused_loss, plain, plain_loss = _models_and_losses(args)
    fused.to(device)
    plain.to(device)

    model_name = type(fused).__name__
    print(f"{model_name} on {data.name}: {len(data.train_labels)} train / {len(data.test_labels)} test samples; "
          f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g}, seed {args.seed}, {device}"
          + (", torch.compile" if args.compile else ""), flush=True)
    results = {
        "myext": _train_and_test("myext", fused, fused_loss, data, args, device),
        "torch": _train_and_test("torch", plain, plain_loss, data, args, device),
    }
    _print_results(results, backend)

    if args.save:
        torch.save(fused.state_dict(), args.save)
        print(f"saved the myext model's state_dict to {args.save} (loads into myext.models.{model_name} "
              f"or the article's {model_name})")
    if args.metrics_json:
        _write_metrics(args.metrics_json, results, {
            "model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "device": str(device), "backend": backend, "compile": args.compile,
            "train_samples": len(data.train_labels), "test_samples": len(data.test_labels)})
    return 0


@subcommand
def add_train_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train SimpleNet or MultiTaskNet with myext beside plain PyTorch",
        description="Trains the article's SimpleNet or MultiTaskNet (second head: the digit's parity) with "
                    "myext's fused ops, then the plain-PyTorch version from the same initial weights, seed and "
                    "data order, and prints the test accuracy and seconds per epoch of both. Data: "
                    "scikit-learn's bundled digits (no download), or MNIST IDX files from --data-dir.")
    parser.add_argument("--model", choices=["simplenet", "multitask"], default="simplenet")
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-dir", type=Path, help="the directory of the MNIST IDX files (--data mnist)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)g)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=list(myext.backends.BACKENDS),
                        help="myext's kernels (default: $MYEXT_BACKEND or the best for the device)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    parser.add_argument("--compile", action="store_true", help="run both models under torch.compile "
                        "(compiling falls in the first epoch, outside the median time per epoch)")
    parser.add_argument("--limit", type=int, help="use at most this many training and test samples (quick runs)")
    parser.add_argument("--save", type=Path, help="save the trained myext model's state_dict here")
    parser.add_argument("--metrics-json", type=Path, help="write the test accuracy and the seconds per epoch "
                        "(median over epochs; every epoch's in epoch_seconds) of both models here")
    parser.set_defaults(run=_run_train)


subcommand(bench.add_parser)  # myext bench: see myext.bench
