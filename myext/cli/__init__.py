"""The ``myext`` command.

``myext check``  the install's self-test (myext.cli.check).
``myext train``  trains the article's models with myext's fused ops beside plain PyTorch
                 (myext.cli.train).
``myext bench``  benchmarks (myext.bench).

Each subcommand module has an ``add_parser(subparsers)`` that adds its parser and sets
the parser's default ``run`` to the function that carries it out: called with the
parsed arguments, it returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

import myext

from .. import bench
from ..data import load_digits_dataset, load_mnist_dataset, read_idx
from . import check, train
from ._errors import CommandError

__all__ = ["CommandError", "build_parser", "load_digits_dataset", "load_mnist_dataset", "main", "read_idx"]

SUBCOMMANDS = (check, train, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="myext", description="myext's command line: self-test, training demo, benchmarks.")
    parser.add_argument("--version", action="version", version=f"myext {myext.__version__} (torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``myext`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for a subcommand that starts itself again in worker processes
    try:
        return args.run(args)
    except CommandError as err:
        print(f"myext {args.command}: error: {err}", file=sys.stderr)
        return 2
