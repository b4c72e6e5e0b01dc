"""Vocabulary-parallel cross-entropy and linear cross-entropy on a gloo process group of
this machine, beside the single-process ops: time and peak memory per rank, and how the
time splits between the kernels and the collectives::

    python benchmarks/bench_vocab_parallel.py                  # 2 ranks, N=4096 C=32000 H=1024 float32
    python benchmarks/bench_vocab_parallel.py --world-size 2 --N 4096 --C 32000 --H 1024

Each rank holds C / world_size classes and runs on one thread; the single-process op
runs on world_size threads, so both use the same cores. Times: medians over rounds,
the ranks starting each round together (a barrier), each rank's time its own; the
collectives alone are the same all_reduce calls on tensors of the same sizes, timed the
same way. Memory: the growth of each process's peak resident set (VmHWM) during one
call after a warm-up, less the gradients the call returns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import myext
from myext import machine
from myext.bench import peak_rss_bytes
from myext.distributed import VocabParallel


def _median_s(call: Callable[[], None], rounds: int, group: bool) -> float:
    call()
    times = []
    for _ in range(rounds):
        if group:
            dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _problem(args: argparse.Namespace):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.N, args.C, generator=generator)
    x = torch.randn(args.N, args.H, generator=generator)
    w = torch.randn(args.C, args.H, generator=generator) / args.H ** 0.5
    target = torch.randint(0, args.C, (args.N,), generator=generator)
    return logits, x, w, target


def _ce_step(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> Callable[[], None]:
    def call() -> None:
        torch.autograd.grad(myext.cross_entropy(logits, target, **kwargs), logits)
    return call


def _linear_ce_step(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, **kwargs) -> Callable[[], None]:
    def call() -> None:
        torch.autograd.grad(myext.linear_cross_entropy(x, w, target, **kwargs), (x, w))
    return call


def _measure(call: Callable[[], None], gradient_bytes: int, rounds: int, group: bool) -> dict[str, float]:
    seconds = _median_s(call, rounds, group)
    growth = peak_rss_bytes(call)
    return {"s": seconds, "beyond_grads_MB": (growth - gradient_bytes) / 1e6 if growth is not None else float("nan")}


def _collectives(sizes: list[tuple[int, dist.ReduceOp]], rounds: int) -> float:
    tensors = [(torch.zeros(n), op) for n, op in sizes]

    def call() -> None:
        for tensor, op in tensors:
            dist.all_reduce(tensor, op=op)
    return _median_s(call, rounds, group=True)


def _rank(rank: int, args: argparse.Namespace, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world_size)
    logits, x, w, target = _problem(args)
    shard = VocabParallel.split(args.C)
    local_logits = logits[:, shard.start:shard.stop].contiguous().requires_grad_()
    local_w = w[shard.start:shard.stop].contiguous().requires_grad_()
    x = x.requires_grad_()
    del logits, w
    row_statistics = [(args.N, dist.ReduceOp.MAX), (4 * args.N + 1, dist.ReduceOp.SUM)]
    found = {
        "cross_entropy": _measure(_ce_step(local_logits, target, vocab_parallel=shard),
                                  local_logits.numel() * 4, args.rounds, group=True),
        "cross_entropy collectives": _collectives(row_statistics, args.rounds),
        "linear_cross_entropy": _measure(_linear_ce_step(x, local_w, target, vocab_parallel=shard),
                                         (x.numel() + local_w.numel()) * 4, args.rounds, group=True),
        "linear_cross_entropy collectives": _collectives(
            row_statistics + [(args.N * args.H, dist.ReduceOp.SUM)], args.rounds),
    }
    gathered = [None] * args.world_size
    dist.all_gather_object(gathered, found)
    if rank == 0:
        results.update(enumerate(gathered))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--C", type=int, default=32000)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.world_size)
    logits, x, w, target = _problem(args)
    logits.requires_grad_(), x.requires_grad_(), w.requires_grad_()
    single = {
        "cross_entropy": _measure(_ce_step(logits, target), logits.numel() * 4, args.rounds, group=False),
        "linear_cross_entropy": _measure(_linear_ce_step(x, w, target), (x.numel() + w.numel()) * 4, args.rounds,
                                         group=False),
    }
    del logits, x, w

    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        shared = manager.dict()
        mp.spawn(_rank, args=(args, os.path.join(tmp, "init"), shared), nprocs=args.world_size)
        ranks = dict(shared)

    print(f"vocabulary-parallel step (loss and gradients), N={args.N} C={args.C} H={args.H} float32, "
          f"{args.world_size} gloo ranks of 1 thread against 1 process of {args.world_size}; "
          f"torch {torch.__version__}, {machine.cpu_description()}")
    print(f"{'op':22} {'where':12} {'median s':>9} {'collectives s':>14} {'beyond grads':>13}")
    for op in ("cross_entropy", "linear_cross_entropy"):
        print(f"{op:22} {'1 process':12} {single[op]['s']:9.3f} {'-':>14} {single[op]['beyond_grads_MB']:10.0f} MB")
        for rank, found in sorted(ranks.items()):
            print(f"{'':22} {f'rank {rank}':12} {found[op]['s']:9.3f} {found[op + ' collectives']:14.4f} "
                  f"{found[op]['beyond_grads_MB']:10.0f} MB")
    row_bytes, logit_row_bytes = 5 * 4, args.C // args.world_size * 4
    print(f"bytes each rank all-reduces per row: cross_entropy {row_bytes}, linear_cross_entropy "
          f"{row_bytes} + {args.H * 4} (the input's gradient); a row of this rank's logits: {logit_row_bytes}")


if __name__ == "__main__":
    sys.exit(main())
