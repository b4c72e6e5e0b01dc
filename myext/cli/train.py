"""``myext train``: trains the article's SimpleNet or MultiTaskNet with myext's fused ops and,
with the same seed, initial weights and data order, its plain-PyTorch version; prints the
test accuracy and time per epoch of both.

With ``--nproc-per-node N`` it starts N copies of itself through torch's launcher
(``torch.distributed.run``) and trains data-parallel (``DistributedDataParallel``, gloo on
the CPU, NCCL on GPUs): each global batch is split across the processes and the
gradients averaged, so that the result is that of one process with the same batch."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..backends import BACKENDS, resolve_backend
from ..data import ImageData, load_digits_dataset, load_mnist_dataset
from ..models import MultiTaskNet, PlainMultiTaskNet, PlainSimpleNet, SimpleNet
from ._errors import CommandError


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


class _Loss(nn.Module):
    """``loss_of(model, images, labels)`` as a module's forward: DistributedDataParallel
    prepares the gradients' all-reduce in the forward of the module it wraps."""

    def __init__(self, model: nn.Module, loss_of: Callable) -> None:
        super().__init__()
        self.model, self.loss_of = model, loss_of

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            # A process whose share of a short last batch is empty adds nothing, but
            # takes part in the gradients' all-reduce.
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        return self.loss_of(self.model, images, labels)


def _train_and_test(label: str, model: nn.Module, loss_of: Callable, data: ImageData, args: argparse.Namespace,
                    device: torch.device) -> _Result:
    """Trains ``model`` on the loss ``loss_of(model, images, labels)``, then tests it;
    data-parallel in a process group (each process takes its share of every batch)."""
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    parallel = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if parallel else (0, 1)
    step_loss: Callable = _Loss(model, loss_of)
    if parallel:
        step_loss = DistributedDataParallel(step_loss, device_ids=[device.index] if device.type == "cuda" else None)
    runner = model
    if args.compile:
        step_loss, runner = torch.compile(step_loss), torch.compile(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # One generator per run, seeded alike: both models see the batches in the same order.
    order = torch.Generator().manual_seed(args.seed)
    count = len(train_y)
    batches = math.ceil(count / args.batch_size)
    epoch_seconds, loss_sum = [], torch.zeros((), device=device)
    for epoch in range(1, args.epochs + 1):
        model.train()
        permutation = torch.randperm(count, generator=order).to(device)
        progress = _Progress(label, epoch, args.epochs, batches) if rank == 0 else None
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        for batch in range(batches):
            index = permutation[batch * args.batch_size:(batch + 1) * args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if parallel:
                # The share's mean loss weighted by its share of the batch: the average
                # DistributedDataParallel takes of the gradients is the batch mean's.
                mine = index.tensor_split(world_size)[rank]
                loss = step_loss(train_x[mine], train_y[mine]) * (len(mine) * world_size / len(index))
            else:
                loss = step_loss(train_x[index], train_y[index])
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            if progress is not None:
                progress.update(batch + 1, lambda: loss_sum.item() / (batch + 1), time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
    if parallel:
        dist.all_reduce(loss_sum)
        loss_sum /= world_size

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
    """(myext model, its loss, plain-PyTorch model, its loss), both models with the same
    initial weights; a loss is ``loss(model, images, labels)``. myext's runs each head
    fused with its loss (the models' ``loss``), PyTorch's the logits then nn.CrossEntropyLoss."""
    torch.manual_seed(args.seed)
    torch_ce = nn.CrossEntropyLoss()
    if args.model == "multitask":
        plain: nn.Module = PlainMultiTaskNet(10, 2)
        fused: nn.Module = MultiTaskNet(10, 2, backend=args.backend)

        def plain_loss(model, images, labels):
            outputs = model(images)
            return torch_ce(outputs[0], labels[:, 0]) + torch_ce(outputs[1], labels[:, 1])

        def fused_loss(model, images, labels):
            return model.loss(images, labels[:, 0], labels[:, 1])
    else:
        plain, fused = PlainSimpleNet(), SimpleNet(backend=args.backend)

        def plain_loss(model, images, labels):
            return torch_ce(model(images), labels)

        def fused_loss(model, images, labels):
            return model.loss(images, labels)
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


def _launch_workers(args: argparse.Namespace) -> int:
    """Runs this command in ``--nproc-per-node`` processes started by torch's launcher,
    which gives each its rank (they train in _run_worker)."""
    from torch.distributed import run as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launcher.main(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "--module", "myext", *args.argv])
    except ChildFailedError as err:
        raise CommandError(f"a training process failed: {err}") from None
    return 0


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node < 1:
        raise CommandError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    launched = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.nproc_per_node > 1 and not launched:
        return _launch_workers(args)
    if launched and args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    device, backend = _validated_device_and_backend(args)
    if not launched:
        return _train(args, device, backend)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        code = _train(args, device, backend)
        # Every process waits for the first to write its report, and lets go of its
        # DistributedDataParallel objects first: torn down earlier, they abort gloo's
        # shutdown ("terminate called without an active exception").
        dist.barrier()
        gc.collect()
        return code
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, backend: str) -> int:
    data = _load_data(args)
    fused, fused_loss, plain, plain_loss = _models_and_losses(args)
    fused.to(device)
    plain.to(device)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1 and args.batch_size < world_size:
        raise CommandError(f"--batch-size {args.batch_size} is smaller than the {world_size} processes sharing it")
    lead = not dist.is_initialized() or dist.get_rank() == 0

    model_name = type(fused).__name__
    if lead:
        print(f"{model_name} on {data.name}: {len(data.train_labels)} train / {len(data.test_labels)} test samples; "
              f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g}, seed {args.seed}, {device}"
              + (", torch.compile" if args.compile else "")
              + (f", data-parallel over {world_size} processes" if world_size > 1 else ""), flush=True)
    results = {
        "myext": _train_and_test("myext", fused, fused_loss, data, args, device),
        "torch": _train_and_test("torch", plain, plain_loss, data, args, device),
    }
    if not lead:
        return 0
    _print_results(results, backend)

    if args.save:
        torch.save(fused.state_dict(), args.save)
        print(f"saved the myext model's state_dict to {args.save} (loads into myext.models.{model_name} "
              f"or the article's {model_name})")
    if args.metrics_json:
        _write_metrics(args.metrics_json, results, {
            "model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "device": str(device), "backend": backend, "compile": args.compile,
            "processes": world_size,
            "train_samples": len(data.train_labels), "test_samples": len(data.test_labels)})
    return 0


def add_parser(subparsers: Any) -> None:
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
    parser.add_argument("--backend", choices=list(BACKENDS),
                        help="myext's kernels (default: $MYEXT_BACKEND or the best for the device)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    parser.add_argument("--compile", action="store_true", help="run both models under torch.compile "
                        "(compiling falls in the first epoch, outside the median time per epoch)")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="train data-parallel in N processes on this machine (DistributedDataParallel through "
                             "torch.distributed.run; gloo on the CPU, NCCL on GPUs, one GPU each); the batch is "
                             "the global one, split across them")
    parser.add_argument("--limit", type=int, help="use at most this many training and test samples (quick runs)")
    parser.add_argument("--save", type=Path, help="save the trained myext model's state_dict here")
    parser.add_argument("--metrics-json", type=Path, help="write the test accuracy and the seconds per epoch "
                        "(median over epochs; every epoch's in epoch_seconds) of both models here")
    parser.set_defaults(run=run)
