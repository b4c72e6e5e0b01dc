"""Runs the vocabulary-parallel and data-parallel cases for tests/test_distributed.py in a
process group of its own: ``python tests/distributed_worker.py SUITE WORLD_SIZE OUT [nccl]``
spawns WORLD_SIZE processes on this machine (gloo on the CPU, or NCCL on one GPU each),
each runs every case of SUITE, and rank 0 writes {case name: [errors]} as JSON to OUT (an
empty list: the case passed).

Each case builds the whole problem on every rank from one seed, runs the sharded op on
this rank's slice of the classes, and compares the loss, the extras and this rank's
slice of the gradients with the single-process op on the whole tensors.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import tempfile
import traceback
from typing import Callable

import torch

if not torch.cuda.is_available():
    # As tests/conftest.py: Triton runs on the CPU only through its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import myext  # noqa: E402
from myext.distributed import VocabParallel  # noqa: E402

CASES: dict[str, dict[str, Callable[[], None]]] = {}
# Where the cases run: the CPU with gloo, or with NCCL each rank's own GPU (set by
# _run_rank, which also makes it torch's default device). NATIVE is its C++ backend.
DEVICE = torch.device("cpu")
NATIVE = "cpp"


def _generator(seed: int) -> torch.Generator:
    """A generator on the cases' device: every rank draws the same tensors."""
    return torch.Generator(DEVICE).manual_seed(seed)


def case(suite: str, name: str):
    def register(fn):
        CASES.setdefault(suite, {})[name] = fn
        return fn
    return register


def close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{name} on rank {dist.get_rank()}: {m}")


# --------------------------------------------------------------------------- cross-entropy

def _lm_options(kind: str, batch: tuple[int, ...], generator: torch.Generator, dtype) -> dict:
    """A language model's options for a case: per-token weights, shift, temperature, and
    the log-probabilities (class indices) and entropies returned."""
    return dict(sample_weight=(torch.rand(batch, generator=generator, dtype=torch.float64) + 0.25).to(dtype),
                shift=1 if kind == "class" else 0, temperature=0.7, return_logprob=kind == "class",
                return_entropy=True)


def _objective(out, generator: torch.Generator, lm: bool):
    """What a case differentiates: the loss under a random upstream gradient, and with
    the extras a random combination of the log-probabilities and entropies too."""
    upstream = torch.randn(out.loss.shape, generator=generator, dtype=torch.float64).to(out.loss.dtype)
    total = (out.loss * upstream).sum()
    if lm:
        for extra in (out.logprob, out.entropy):
            if extra is not None:
                total = total + (extra * torch.randn(extra.shape, generator=generator, dtype=torch.float64)
                                 .to(extra.dtype)).sum()
    return total


def _ce_case(*, kind: str = "class", weighted: str = "", dtype=torch.float64, backend: str = "native",
             rows: int = 6, classes: int = 11, scale: float = 3.0, shape_suffix: tuple[int, ...] = (),
             lm: bool = False, **options) -> Callable[[], None]:
    def run() -> None:
        name = NATIVE if backend == "native" else backend
        generator = _generator(1234)
        logits = (torch.randn(rows, classes, *shape_suffix, generator=generator, dtype=torch.float64) * scale)
        if kind == "class":
            target = torch.randint(0, classes, (rows, *shape_suffix), generator=generator)
            target.view(-1)[1] = options.get("ignore_index", -100)
        else:
            target = torch.softmax(torch.randn(rows, classes, *shape_suffix, generator=generator,
                                               dtype=torch.float64), dim=1)
        weight = torch.rand(classes, generator=generator, dtype=torch.float64) + 0.5 if weighted else None
        shard = VocabParallel.split(classes)
        local = logits[:, shard.start:shard.stop].to(dtype).requires_grad_()
        local_target = target[:, shard.start:shard.stop].to(dtype) if kind == "prob" else target
        shard_weight = None
        if weight is not None:
            shard_weight = (weight if weighted == "full" else weight[shard.start:shard.stop]).to(dtype)
        extras = kind == "class"
        call_options = {**options, **_lm_options(kind, (rows, *shape_suffix), generator, dtype)} if lm else options
        out = myext.cross_entropy(local, local_target, shard_weight, vocab_parallel=shard, backend=name,
                                  return_lse=True, return_accuracy=extras, **call_options)
        whole = logits.to(dtype).requires_grad_()
        expected = myext.cross_entropy(whole, target.to(dtype) if kind == "prob" else target,
                                       weight.to(dtype) if weight is not None else None, backend=NATIVE,
                                       return_lse=True, return_accuracy=extras, **call_options)
        (grad,) = torch.autograd.grad(_objective(out, torch.Generator().manual_seed(3), lm), local)
        (expected_grad,) = torch.autograd.grad(_objective(expected, torch.Generator().manual_seed(3), lm), whole)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else (
            dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3))
        close("loss", out.loss, expected.loss, **tol)
        close("lse", out.lse, expected.lse, **tol)
        if extras:
            close("accuracy", out.accuracy, expected.accuracy, rtol=0, atol=0)
        for extra in ("logprob", "entropy") if lm else ():
            if getattr(expected, extra) is not None:
                close(extra, getattr(out, extra), getattr(expected, extra), **tol)
        close("grad", grad, expected_grad[:, shard.start:shard.stop], **tol)
    return run


for _name, _kwargs in {
    "class": {},
    "class weighted smoothing none": dict(weighted="local", label_smoothing=0.1, reduction="none"),
    "class full weight sum": dict(weighted="full", reduction="sum"),
    "class weighted smoothing mean": dict(weighted="local", label_smoothing=0.2),
    "class ignore_index=3 zloss softcap": dict(ignore_index=3, lse_square_scale=0.01, softcap=4.0,
                                                label_smoothing=0.1),
    "class 3-d": dict(shape_suffix=(2,), reduction="none", weighted="local"),
    "prob": dict(kind="prob"),
    "prob weighted smoothing none": dict(kind="prob", weighted="local", label_smoothing=0.1, reduction="none"),
    "prob zloss softcap sum": dict(kind="prob", lse_square_scale=0.02, softcap=3.0, reduction="sum"),
    "class float32": dict(dtype=torch.float32, rows=40, classes=300, label_smoothing=0.1, weighted="local"),
    "class bfloat16": dict(dtype=torch.bfloat16, rows=40, classes=300, label_smoothing=0.1),
    "prob float32": dict(kind="prob", dtype=torch.float32, rows=20, classes=300, reduction="none"),
    "class fewer classes than ranks": dict(classes=2, weighted="local", label_smoothing=0.1),
    "triton backend": dict(backend="triton", weighted="local", label_smoothing=0.1, lse_square_scale=0.01,
                           softcap=4.0),
    "triton backend prob": dict(backend="triton", kind="prob", weighted="local", reduction="none"),
    "torch backend": dict(backend="torch", weighted="local", label_smoothing=0.1, lse_square_scale=0.01),
    "torch backend prob": dict(backend="torch", kind="prob", weighted="local", label_smoothing=0.1),
    "LM options": dict(lm=True, weighted="local", label_smoothing=0.1, softcap=4.0),
    "LM options sum": dict(lm=True, reduction="sum", lse_square_scale=0.01),
    "LM options none 3-d": dict(lm=True, reduction="none", shape_suffix=(3,)),
    "LM options prob": dict(lm=True, kind="prob", weighted="local"),
    "LM options fewer classes than ranks": dict(lm=True, classes=2),
    "LM options triton": dict(lm=True, backend="triton", weighted="local"),
    "LM options torch": dict(lm=True, backend="torch", weighted="local"),
}.items():
    case("cross_entropy", _name)(_ce_case(**_kwargs))


class _WholeGradient(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the ranks: each rank's sharded
    loss gives the gradient of its own columns of the whole logits, their sum the whole
    gradient, which gradcheck's numerical one (every rank perturbs the same element of
    the whole logits at once) is."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


@case("cross_entropy", "gradcheck")
def _gradcheck() -> None:
    # gradcheck over the whole logits: every rank then makes the same number of calls,
    # and with them of collectives, also where the shards differ in size.
    shard = VocabParallel.split(7)
    generator = _generator(5)
    logits = torch.randn(4, 7, generator=generator, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 6, -100, 3])
    weight = (torch.rand(7, generator=generator, dtype=torch.float64) + 0.5)[shard.start:shard.stop]

    def columns(x):
        return _WholeGradient.apply(x)[:, shard.start:shard.stop]

    for backend in (NATIVE, "torch"):
        def loss(x, backend=backend):
            return myext.cross_entropy(columns(x), target, weight, label_smoothing=0.1, lse_square_scale=0.05,
                                       softcap=2.0, reduction="none", vocab_parallel=shard, backend=backend)
        torch.autograd.gradcheck(loss, (logits,))
    probabilities = torch.softmax(torch.randn(4, 7, generator=generator, dtype=torch.float64), dim=1)
    torch.autograd.gradcheck(
        lambda x, q: myext.cross_entropy(columns(x), columns(q), weight, label_smoothing=0.2, vocab_parallel=shard),
        (logits, probabilities.requires_grad_()))


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(DEVICE.type, (dist.get_world_size(),))


@case("cross_entropy", "DTensor Shard(1)")
def _dtensor() -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh()
    for classes in (11, 2):  # DTensor's split: 4, 4, 3 and 1, 1, 0 classes over 3 ranks
        generator = _generator(classes)
        logits = torch.randn(6, classes, generator=generator, dtype=torch.float64)
        target = torch.randint(0, classes, (6,), generator=generator)
        target[1] = -100
        weight = torch.rand(classes, generator=generator, dtype=torch.float64) + 0.5
        sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
        out = myext.cross_entropy(sharded, target, distribute_tensor(weight, mesh, [Replicate()]),
                                  label_smoothing=0.1, return_lse=True)
        out.loss.backward()
        whole = logits.clone().requires_grad_()
        expected = myext.cross_entropy(whole, target, weight, label_smoothing=0.1, return_lse=True)
        expected.loss.backward()
        close("loss", out.loss, expected.loss, rtol=1e-10, atol=1e-12)
        close("lse", out.lse, expected.lse, rtol=1e-10, atol=1e-12)
        close("grad", sharded.grad.full_tensor(), whole.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- linear cross-entropy

def _linear_ce_case(*, kind: str = "class", weighted: str = "", bias: bool = True, dtype=torch.float64,
                    backend: str = "native", rows: int = 9, features: int = 5, classes: int = 11,
                    chunk_size: int = 4, batch: tuple[int, ...] = (), lm: bool = False,
                    **options) -> Callable[[], None]:
    def run() -> None:
        name = NATIVE if backend == "native" else backend
        generator = _generator(99)
        shape = (*batch, rows)
        x = torch.randn(*shape, features, generator=generator, dtype=torch.float64)
        w = torch.randn(classes, features, generator=generator, dtype=torch.float64)
        b = torch.randn(classes, generator=generator, dtype=torch.float64) if bias else None
        if kind == "class":
            target = torch.randint(0, classes, shape, generator=generator)
            target.view(-1)[1] = options.get("ignore_index", -100)
        else:
            target = torch.softmax(torch.randn(*shape, classes, generator=generator, dtype=torch.float64), dim=-1)
        weight = torch.rand(classes, generator=generator, dtype=torch.float64) + 0.5 if weighted else None
        shard = VocabParallel.split(classes)
        part = slice(shard.start, shard.stop)
        leaves = [x.to(dtype).requires_grad_(), w[part].to(dtype).requires_grad_()]
        whole = [x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
        if bias:
            leaves.append(b[part].to(dtype).requires_grad_())
            whole.append(b.to(dtype).requires_grad_())
        local_target = target[..., part].to(dtype) if kind == "prob" else target
        shard_weight = None
        if weight is not None:
            shard_weight = (weight if weighted == "full" else weight[part]).to(dtype)
        extras = kind == "class"
        call_options = {**options, **_lm_options(kind, shape, generator, dtype)} if lm else options
        out = myext.linear_cross_entropy(leaves[0], leaves[1], local_target, linear_bias=leaves[2] if bias else None,
                                         weight=shard_weight, vocab_parallel=shard, backend=name,
                                         chunk_size=chunk_size, return_lse=True, return_accuracy=extras, **call_options)
        expected = myext.linear_cross_entropy(whole[0], whole[1], target.to(dtype) if kind == "prob" else target,
                                              linear_bias=whole[2] if bias else None,
                                              weight=weight.to(dtype) if weight is not None else None, backend=NATIVE,
                                              return_lse=True, return_accuracy=extras, **call_options)
        grads = torch.autograd.grad(_objective(out, torch.Generator().manual_seed(3), lm), leaves)
        expected_grads = torch.autograd.grad(_objective(expected, torch.Generator().manual_seed(3), lm), whole)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else (
            dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2))
        close("loss", out.loss, expected.loss, **tol)
        close("lse", out.lse, expected.lse, **tol)
        if extras:
            close("accuracy", out.accuracy, expected.accuracy, rtol=0, atol=0)
        for extra in ("logprob", "entropy") if lm else ():
            if getattr(expected, extra) is not None:
                close(extra, getattr(out, extra), getattr(expected, extra), **tol)
        close("grad input", grads[0], expected_grads[0], **tol)
        close("grad linear_weight", grads[1], expected_grads[1][part], **tol)
        if bias:
            close("grad linear_bias", grads[2], expected_grads[2][part], **tol)
    return run


for _name, _kwargs in {
    "class": {},
    "class weighted smoothing none": dict(weighted="local", label_smoothing=0.1, reduction="none"),
    "class no bias full weight sum": dict(bias=False, weighted="full", reduction="sum"),
    "class zloss softcap batch (2, 9)": dict(batch=(2,), lse_square_scale=0.01, softcap=4.0, ignore_index=2),
    "prob weighted smoothing": dict(kind="prob", weighted="local", label_smoothing=0.1),
    "prob none": dict(kind="prob", reduction="none", chunk_size=100),
    "class float32": dict(dtype=torch.float32, rows=64, features=32, classes=300, chunk_size=16,
                          label_smoothing=0.1),
    "class bfloat16": dict(dtype=torch.bfloat16, rows=64, features=32, classes=300, chunk_size=16),
    "class fewer classes than ranks": dict(classes=2, weighted="local"),
    "triton backend": dict(backend="triton", weighted="local", label_smoothing=0.1),
    "torch backend": dict(backend="torch", weighted="local", label_smoothing=0.1, lse_square_scale=0.01),
    "LM options": dict(lm=True, weighted="local", softcap=4.0, batch=(2,)),
    "LM options none": dict(lm=True, reduction="none", label_smoothing=0.1),
    "LM options prob": dict(lm=True, kind="prob"),
    "LM options triton": dict(lm=True, backend="triton"),
    "LM options torch": dict(lm=True, backend="torch", weighted="local"),
}.items():
    case("linear_cross_entropy", _name)(_linear_ce_case(**_kwargs))


@case("linear_cross_entropy", "gradcheck")
def _linear_gradcheck() -> None:
    shard = VocabParallel.split(7)
    generator = _generator(7)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64).requires_grad_()
    w = torch.randn(7, 3, generator=generator, dtype=torch.float64).requires_grad_()
    b = torch.randn(7, generator=generator, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 6, -100, 3, 4])
    part = slice(shard.start, shard.stop)

    def loss(x, w, b):
        # x's gradient is already summed over the ranks; w's and b's rows are each one
        # rank's: summed over the ranks, they make the whole gradients gradcheck takes.
        return myext.linear_cross_entropy(x, _WholeGradient.apply(w)[part], target,
                                          linear_bias=_WholeGradient.apply(b)[part], label_smoothing=0.1,
                                          lse_square_scale=0.05, softcap=2.0, reduction="none", chunk_size=2,
                                          vocab_parallel=shard)
    torch.autograd.gradcheck(loss, (x, w, b))


@case("linear_cross_entropy", "DTensor Shard(0) weight")
def _linear_dtensor() -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = _mesh()
    generator = _generator(4)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    w = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(11, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 11, (7,), generator=generator)
    leaves = [x.clone().requires_grad_(), distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(),
              distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()]
    loss = myext.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], chunk_size=3)
    loss.backward()
    whole = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = myext.linear_cross_entropy(whole[0], whole[1], target, linear_bias=whole[2])
    expected.backward()
    close("loss", loss, expected, rtol=1e-10, atol=1e-12)
    close("grad input", leaves[0].grad, whole[0].grad, rtol=1e-10, atol=1e-12)
    close("grad linear_weight", leaves[1].grad.full_tensor(), whole[1].grad, rtol=1e-10, atol=1e-12)
    close("grad linear_bias", leaves[2].grad.full_tensor(), whole[2].grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- data parallelism

class _Loss(torch.nn.Module):
    """A model's fused loss as the forward of a module, for DistributedDataParallel."""

    def __init__(self, model: torch.nn.Module, loss_of: Callable) -> None:
        super().__init__()
        self.model, self.loss_of = model, loss_of

    def forward(self, *args):
        return self.loss_of(self.model, *args)


def _data_parallel_case(model_name: str, wrap: str) -> Callable[[], None]:
    """A few SGD steps of the article's model in float64 on batches of 12 split across the
    ranks, against the same steps in this process on the whole batches."""
    def run() -> None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        generator = _generator(3)
        images = torch.randn(3, 12, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (3, 12), generator=generator)
        if model_name == "SimpleNet":
            def make():
                return myext.models.SimpleNet().double()

            def loss_of(model, x, y):
                return model.loss(x, y)
        else:
            def make():
                return myext.models.MultiTaskNet(10, 2).double()

            def loss_of(model, x, y):
                return model.loss(x, y, y % 2)
        torch.manual_seed(0)
        single = make()
        torch.manual_seed(0)
        model = make()
        if wrap == "DDP":
            step = torch.nn.parallel.DistributedDataParallel(_Loss(model, loss_of))
        else:
            torch.distributed.fsdp.fully_shard(model)
            torch.distributed.fsdp.register_fsdp_forward_method(model, "loss")

            def step(x, y):
                return loss_of(model, x, y)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, model)]
        for x, y in zip(images, labels):
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss_of(single, x, y).backward()
            mine = torch.arange(12).tensor_split(world_size)[rank]
            # Each share's mean weighted by its share of the batch: DDP and FSDP average
            # the gradients over the ranks.
            (step(x[mine], y[mine]) * (len(mine) * world_size / 12)).backward()
            for optimizer in optimizers:
                optimizer.step()
        for (name, expected), actual in zip(single.named_parameters(), model.parameters()):
            if wrap == "FSDP2":
                actual = actual.full_tensor()
            close(name, actual.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    return run


for _model in ("SimpleNet", "MultiTaskNet"):
    for _wrap in ("DDP", "FSDP2"):
        case("data_parallel", f"{_wrap} {_model}")(_data_parallel_case(_model, _wrap))


# --------------------------------------------------------------------------- driver

def _run_rank(rank: int, world_size: int, suite: str, init_file: str, out: str, group_backend: str) -> None:
    global DEVICE, NATIVE
    torch.set_num_threads(1)
    if group_backend == "nccl":
        DEVICE, NATIVE = torch.device("cuda", rank), "cuda"
        torch.cuda.set_device(DEVICE)
        torch.set_default_device(DEVICE)
    # A rank that fails between collectives leaves the others waiting: the timeout
    # turns that into an error of the case instead of a test run that never ends.
    dist.init_process_group(group_backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, fn in CASES[suite].items():
        try:
            fn()
            errors = []
        except Exception:
            errors = [traceback.format_exc(limit=-3)]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, errors)
        results[name] = [e for rank_errors in gathered for e in rank_errors]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    _leave(rank)


def _leave(rank: int) -> None:
    """Tears the group down once every rank is done, and the DDP and FSDP objects of the
    cases are gone."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    suite, world_size, out = argv[0], int(argv[1]), argv[2]
    group_backend = argv[3] if len(argv) > 3 else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run_rank, args=(world_size, suite, os.path.join(tmp, "init"), out, group_backend),
                 nprocs=world_size)


if __name__ == "__main__":
    main(sys.argv[1:])
