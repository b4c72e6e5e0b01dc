"""Derivatives of functions built from torch ops, as graphs that differentiate again,
in whichever autograd is active.

The autograd Functions' first derivatives come from their kernels. Their second
derivatives (double backward, and forward-over-reverse: ``torch.func.hessian``,
``gradgradcheck(check_fwd_over_rev=True)``) come from the plain-PyTorch reference of
their gradient: exact for every option, with no second formula to keep in step with
the reference. Two autograds may be asking: PyTorch's own (``backward(create_graph=
True)``, ``forward_ad``), which needs leaves that require grad, and torch.func's
transforms, which forbid making them and cannot nest inside a ``forward_ad`` level.
Each helper uses the one that is running.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch._C._functorch import peek_interpreter_stack


def vjp_of(fn: Callable[..., torch.Tensor], primals: Sequence[Optional[torch.Tensor]],
           cotangent: torch.Tensor, wanted: Sequence[bool]) -> tuple[Optional[torch.Tensor], ...]:
    """J^T cotangent for each of ``primals`` that is ``wanted`` (None for the others),
    ``fn(*primals)`` differentiated, as a graph that differentiates again."""
    if peek_interpreter_stack() is not None:
        moved = [i for i, w in enumerate(wanted) if w]
        _, pullback = torch.func.vjp(_of_moved(fn, primals, moved), *[primals[i] for i in moved])
        found = iter(pullback(cotangent))
        return tuple(next(found) if w else None for w in wanted)
    with torch.enable_grad():
        # A primal that requires grad is used as it is, so that the result stays
        # connected to the graph it belongs to (double backward of a double backward).
        leaves = [p if not w or p.requires_grad else p.detach().requires_grad_() for p, w in zip(primals, wanted)]
        moved = [leaf for leaf, w in zip(leaves, wanted) if w]
        found = iter(torch.autograd.grad(fn(*leaves), moved, cotangent, create_graph=True, allow_unused=True))
    return tuple(_zeros_if_none(next(found), p) if w else None for p, w in zip(primals, wanted))


def jvp_of(fn: Callable[..., torch.Tensor], primals: Sequence[Optional[torch.Tensor]],
           tangents: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """J v: the derivative of ``fn(*primals)`` along ``tangents`` (None: zero).

    Under torch.func, its own jvp. Otherwise (inside a ``forward_ad`` level, where a
    second one cannot be opened) two reverse passes: u -> J^T u is linear in u, so the
    gradient of <J^T u, v> with respect to u is J v.
    """
    wanted = [t is not None for t in tangents]
    if peek_interpreter_stack() is not None:
        moved = [i for i, w in enumerate(wanted) if w]
        # Dense copies: torch.func.jvp cannot pair a primal with an expanded tangent or
        # the reverse (an upstream gradient of ones often is one), whatever its logical
        # strides say under vmap.
        dense = [(primals[i].clone(memory_format=torch.contiguous_format),
                  tangents[i].clone(memory_format=torch.contiguous_format)) for i in moved]
        return torch.func.jvp(_of_moved(fn, primals, moved), tuple(p for p, _ in dense),
                              tuple(t for _, t in dense))[1]
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() if w else (p.detach() if isinstance(p, torch.Tensor) else p)
                  for p, w in zip(primals, wanted)]
        out = fn(*leaves)
        u = torch.zeros_like(out, requires_grad=True)
        moved = [(leaf, t) for leaf, t in zip(leaves, tangents) if t is not None]
        vjps = torch.autograd.grad(out, [leaf for leaf, _ in moved], u, create_graph=True, allow_unused=True)
        inner = sum(((v * t).sum() for v, (_, t) in zip(vjps, moved) if v is not None), out.new_zeros(()))
        if not inner.requires_grad:  # fn does not depend on the primals moved
            return torch.zeros_like(out)
        (jvp,) = torch.autograd.grad(inner, u, allow_unused=True)
    return _zeros_if_none(jvp, out)


def _of_moved(fn: Callable[..., torch.Tensor], primals: Sequence, moved: Sequence[int]) -> Callable[..., torch.Tensor]:
    """``fn`` as a function of the primals at the indices ``moved`` only, the others
    fixed: what torch.func's vjp and jvp differentiate."""
    def of_moved(*values):
        args = list(primals)
        for i, value in zip(moved, values):
            args[i] = value
        return fn(*args)
    return of_moved


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(like)
