"""The checks myext runs on its own ops, for any op: a user's ``autograd.Function``, a
registered custom op, or a module.

:func:`check` takes the function, a plain-PyTorch reference with the same arguments and
a few sample calls (float64 inputs; the tensors that require grad are differentiated),
runs the battery and returns a :class:`Report` with one :class:`Result` per check,
sample and dtype:

``gradcheck``, ``gradgradcheck``
    ``torch.autograd.gradcheck`` and ``gradgradcheck`` in float64.
``opcheck``
    ``torch.library.opcheck`` of every registered op (outside ``aten``/``prims``) that
    forward and backward call, with the arguments they were called with; for a
    function that is itself a registered op, of the function too. Left out where no
    such op runs.
``ops ran``
    every op named in ``expected_ops`` ran (so a backend really used its own kernels);
    left out without ``expected_ops``.
``compile``
    ``torch.compile(fullgraph=True)`` gives the eager outputs and gradients.
``inputs unchanged``
    forward and backward leave every tensor argument as it was.
``no_grad``
    under ``torch.no_grad()`` the outputs are the same and carry no graph.
``forward AD``
    ``gradcheck`` of forward-mode AD (``check_forward_ad``, batched tangents too)
    against finite differences: a tangent that is silently zero or wrong fails it.
``batched grad``
    ``gradcheck(check_batched_grad=True)``: backward under vmap gives each element's
    gradient.
``forward over reverse``
    ``gradgradcheck(check_fwd_over_rev=True)``: forward-mode AD through the backward
    (what ``torch.func.hessian`` does).
``reentrant``
    two backward passes through one retained graph, with a random (non-unit) upstream
    gradient, give the same bits.
``torch.func``
    ``torch.func.grad``, ``jacfwd``, ``vmap`` and a Hessian-vector product
    (``jvp`` of ``grad``) of a random projection of the outputs against PyTorch's
    reverse mode of the same function (``autograd.grad``, twice for the Hessian) and
    against a loop of calls.
``vs reference``
    outputs and input gradients against a float64 ground truth (the reference on the
    same values in float64), in float64 and in each of ``dtypes``: the error may be at
    most twice PyTorch's own error in that dtype (the ``baseline``'s, by default the
    reference's), plus ``floor_ulps`` units of the dtype's rounding at the largest true
    value (for results PyTorch happens to get exact). In float64 the reference is its own ground truth, so there the
    allowance is ``float64_ulps`` units at the largest true value of the whole sample,
    for sums taken in another order. A kernel that accumulated in low precision fails it.

An op may refuse a mode it does not support by raising ``NotImplementedError`` (as
PyTorch does for an ``autograd.Function`` without ``jvp``), or through PyTorch's own
error for a Function that torch.func cannot transform: the check is then reported as
``refused``, which is not a failure. Any other error, and any wrong or missing
derivative, is.

Example::

    >>> class Square(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return x * x
    ...     @staticmethod
    ...     def backward(ctx, grad):
    ...         (x,) = ctx.saved_tensors
    ...         return 2 * x * grad
    >>> x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    >>> report = myext.testing.check(Square.apply, lambda x: x * x, [Sample((x,))])
    >>> report.ok
    True
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .registry import Sample  # defined with the op specs that list samples; check() takes them too

__all__ = ["CHECKS", "MODE_CHECKS", "Report", "Result", "Sample", "check"]

CHECKS = ("gradcheck", "gradgradcheck", "forward AD", "batched grad", "forward over reverse", "reentrant",
          "torch.func", "opcheck", "ops ran", "compile", "inputs unchanged", "no_grad", "vs reference")
# The autograd modes beyond reverse mode, which an op may refuse (see the module's docstring).
MODE_CHECKS = ("forward AD", "batched grad", "forward over reverse", "torch.func")
# PyTorch's own words where it cannot run a mode on a Function, as opposed to a wrong result.
_TORCH_REFUSALS = ("must override the setup_context staticmethod", "You must implement the jvp function",
                   "Batching rule not implemented")
_BUILTIN_NAMESPACES = frozenset({"aten", "prims", "prim", "_ops", "profiler", "debugprims"})


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one check on one sample in one dtype.

    Attributes:
        check: one of :data:`CHECKS`.
        sample: the sample's name (its index where it has none).
        dtype: the dtype the check ran in, e.g. ``"float64"``.
        passed: whether it passed.
        max_error: for ``vs reference``, the largest absolute error against the ground truth.
        detail: why it failed, or what it measured.
        refused: the op refused the mode this check runs (it passed: refusing loudly is
            not a wrong answer); ``detail`` holds its error.
    """

    check: str
    sample: str
    dtype: str
    passed: bool
    max_error: Optional[float] = None
    detail: str = ""
    refused: bool = False


class Report(list):
    """The results of :func:`check`, a list of :class:`Result`."""

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(r.passed for r in self)

    def failures(self) -> list[Result]:
        return [r for r in self if not r.passed]

    def refused(self) -> list[str]:
        """The checks of autograd modes that the op refused, each once."""
        return list(dict.fromkeys(r.check for r in self if r.refused))

    def assert_ok(self) -> None:
        """Raises AssertionError listing every failed check."""
        failed = self.failures()
        if failed:
            lines = [f"{r.check} [{r.sample}, {r.dtype}]: {r.detail}" for r in failed]
            raise AssertionError(f"{len(failed)} of {len(self)} checks failed:\n" + "\n".join(lines))

    def __str__(self) -> str:
        header = ("check", "sample", "dtype", "result", "max error", "detail")
        rows = [(r.check, r.sample, r.dtype, "refused" if r.refused else "ok" if r.passed else "FAIL",
                 "-" if r.max_error is None else f"{r.max_error:.1e}", _shortened(r.detail)) for r in self]
        widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip()
                         for line in [header, *rows])


def _shortened(text: str, limit: int = 60) -> str:
    """A table cell of at most ``limit`` characters (the Result keeps the whole text)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- calling

class _Call:
    """A sample bound to the function: the differentiable inputs as a list, and the call
    as a function of their values (a module's trainable parameters count among them)."""

    def __init__(self, fn: Callable, sample: Sample, dtype: Optional[torch.dtype] = None) -> None:
        def cast(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is not None:
                # The same strides in the new dtype (.to would make a sliced tensor contiguous).
                copy = torch.empty_strided(value.shape, value.stride(), dtype=dtype, device=value.device)
                return copy.copy_(value.detach()).requires_grad_(value.requires_grad)
            return value

        self.args = [cast(a) for a in sample.args]
        self.kwargs = {k: cast(v) for k, v in sample.kwargs.items()}
        self.module: Optional[torch.nn.Module] = None
        if isinstance(fn, torch.nn.Module):
            self.module = copy.deepcopy(fn).to(dtype) if dtype is not None else fn
            self.param_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
            params = dict(self.module.named_parameters())
            self.params = [params[n] for n in self.param_names]
        else:
            self.param_names, self.params = [], []
        self.fn = fn
        self.arg_slots = [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor) and a.requires_grad]
        # Keyword tensors that require grad are differentiated too (a keyword-only bias).
        self.kwarg_slots = [k for k, v in self.kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    @property
    def inputs(self) -> list[torch.Tensor]:
        return ([self.args[i] for i in self.arg_slots] + [self.kwargs[k] for k in self.kwarg_slots]
                + list(self.params))

    def __call__(self, *values: torch.Tensor):
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in zip(self.arg_slots, values):
            args[slot] = value
        values = values[len(self.arg_slots):]
        for name, value in zip(self.kwarg_slots, values):
            kwargs[name] = value
        values = values[len(self.kwarg_slots):]
        if self.module is None:
            return self.fn(*args, **kwargs)
        params = dict(zip(self.param_names, values))
        return torch.func.functional_call(self.module, params, tuple(args), kwargs)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _outputs_and_grads(call: _Call, grad_seed: int, grad_dtype: Optional[torch.dtype] = None):
    """The floating outputs of a call and the gradients of sum(output * g) for each
    differentiable input, g standard normal (drawn in float64 from ``grad_seed``, and
    rounded to ``grad_dtype`` first where given: the ground truth takes the upstream
    gradient a low-precision call had)."""
    inputs = call.inputs
    outputs = [t for t in _tensors(call(*inputs)) if t.is_floating_point()]
    generator = torch.Generator().manual_seed(grad_seed)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(grad_dtype or t.dtype)
                .to(t.device, t.dtype) for t in outputs]
    differentiable = [(o, g) for o, g in zip(outputs, upstream) if o.requires_grad]
    grads: list[Optional[torch.Tensor]] = [None] * len(inputs)
    if differentiable and inputs:
        grads = list(torch.autograd.grad([o for o, _ in differentiable], inputs, [g for _, g in differentiable],
                                         allow_unused=True))
    return [o.detach() for o in outputs], grads


class _RecordOps(TorchDispatchMode):
    """Records each registered op outside torch's own namespaces called beneath it, with a
    copy of its arguments made before the call (an in-place op changes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[torch._ops.OpOverload, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in _BUILTIN_NAMESPACES and func not in self.calls:
            copy_arg = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.calls[func] = (tree_map(copy_arg, args), tree_map(copy_arg, kwargs))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the checks

def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    diff = (a.double() - b.double()).abs()
    # Where both are the same infinity or both NaN, there is no error; where only one
    # is NaN, the error is infinite.
    same = (a.double() == b.double()) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(diff), torch.nan_to_num(diff, nan=math.inf))
    return float(diff.max())


def _largest_finite(t: torch.Tensor) -> float:
    finite = t.detach()[t.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _vs_reference(fn, reference, baseline, sample: Sample, dtype: torch.dtype, ulps: float,
                  grad_seed: int) -> tuple[float, bool, str]:
    ours = _Call(fn, sample, dtype)
    by_reference = _Call(reference, sample, dtype)
    by_baseline = by_reference if baseline is None else _Call(baseline, sample, dtype)
    # The ground truth: the reference in float64 on the values the dtype holds.
    truth_fn = by_reference.module if by_reference.module is not None else reference
    truth = _Call(truth_fn, Sample(tuple(ours.args), dict(ours.kwargs)), torch.float64)
    out, grads = _outputs_and_grads(ours, grad_seed)
    ref_out, ref_grads = _outputs_and_grads(by_baseline, grad_seed)
    truth_out, truth_grads = _outputs_and_grads(truth, grad_seed, grad_dtype=dtype)

    eps = torch.finfo(dtype).eps
    worst, passed, notes = 0.0, True, []
    named = [(f"output {i}", o, r, t) for i, (o, r, t) in enumerate(zip(out, ref_out, truth_out))]
    named += [(f"grad of input {i}", g, r, t) for i, (g, r, t) in enumerate(zip(grads, ref_grads, truth_grads))
              if t is not None]
    if len(out) != len(truth_out):
        return math.nan, False, f"{len(out)} outputs where the reference gives {len(truth_out)}"
    # In float64 the reference is the ground truth itself, so the allowance is for sums
    # taken in another order, at the scale of the whole sample: a result that cancels
    # to nearly 0 (a gradient whose terms balance) carries its terms' rounding.
    sample_scale = max((_largest_finite(t) for _, _, _, t in named), default=0.0)
    for what, value, by_reference, truth in named:
        if value is None:
            return math.nan, False, f"no {what}, where the reference has one"
        if value.shape != truth.shape or value.dtype != by_reference.dtype:
            return math.nan, False, (f"{what} is {value.dtype} {tuple(value.shape)}, the reference's "
                                     f"{by_reference.dtype} {tuple(truth.shape)}")
        error = _max_abs(value, truth)
        reference_error = _max_abs(by_reference, truth)
        largest = sample_scale if dtype == torch.float64 else _largest_finite(truth)
        allowed = 2 * reference_error + ulps * eps * largest
        worst = max(worst, error)
        if not error <= allowed:
            passed = False
            notes.append(f"{what}: error {error:.3g}, PyTorch's {reference_error:.3g}, allowed {allowed:.3g}")
    return worst, passed, "; ".join(notes)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def check(
    fn: Union[Callable[..., Any], torch.nn.Module],
    reference: Optional[Union[Callable[..., Any], torch.nn.Module]],
    samples: Iterable[Union[Sample, Sequence[Any]]],
    *,
    checks: Sequence[str] = CHECKS,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    expected_ops: Sequence[str] = (),
    floor_ulps: float = 4.0,
    float64_ulps: float = 64.0,
    grad_seed: int = 0,
    baseline: Optional[Callable[..., Any]] = None,
    gradcheck_fast_mode: bool = False,
) -> Report:
    r"""Runs the battery of checks on ``fn`` for each sample; returns the :class:`Report`.

    Args:
        fn: what is checked: a function (an ``autograd.Function``'s ``apply``, say), a
            registered op (``torch.ops.mylib.op``) or an ``nn.Module``, whose trainable
            parameters are then differentiated too.
        reference: the same computation in plain PyTorch, with ``fn``'s arguments (a
            module with the same parameter names for a module); ``None`` leaves out
            ``vs reference``.
        samples: :class:`Sample`\ s (or tuples of positional arguments) in float64; the
            tensors that require grad are the differentiable inputs.
        checks: which checks to run, from :data:`CHECKS`.
        dtypes: the dtypes of ``vs reference`` besides float64 (floating inputs and the
            module's parameters are cast).
        expected_ops: qualified names of ops that must run (``"mylib::op"``), for ``ops ran``.
        floor_ulps: ``vs reference``'s allowance beyond twice PyTorch's error, in units
            of the dtype's rounding (its eps) at the largest true value: the few
            roundings that two correct implementations may differ by (another order
            of a sum, another exp), where PyTorch's own error happens to be small.
        float64_ulps: the same in float64, where the reference is the ground truth.
        grad_seed: seeds the upstream gradients of ``vs reference``.
        baseline: what PyTorch itself computes for these arguments (``F.cross_entropy``,
            say), whose error in each dtype is the yardstick of ``vs reference``; by
            default the reference's own.
        gradcheck_fast_mode: ``gradcheck`` and ``gradgradcheck`` compare the Jacobian
            along random directions, not entry by entry (``torch.autograd.gradcheck``'s
            ``fast_mode``): a few calls of ``fn`` per input instead of two per input
            element, for a ``fn`` whose calls are slow (Triton's interpreter, say).

    Returns:
        A :class:`Report`; ``report.assert_ok()`` raises if anything failed.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    report = Report()
    for index, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            sample = Sample(tuple(sample))
        label = sample.name or str(index)

        def record(name: str, passed: bool, detail: str = "", dtype: str = "float64",
                   max_error: Optional[float] = None, refused: bool = False) -> None:
            report.append(Result(name, label, dtype, passed, max_error, detail, refused))

        def attempt(name: str, body: Callable[[], Optional[str]]) -> None:
            if name not in checks:
                return
            try:
                detail = body()
            except Exception as err:  # a check reports its failure and the battery goes on
                refused = name in MODE_CHECKS and _is_refusal(err)
                record(name, refused, _first_line(err), refused=refused)
            else:
                record(name, True, detail or "")

        call = _Call(fn, sample)
        attempt("gradcheck", lambda: _gradcheck(torch.autograd.gradcheck, call, gradcheck_fast_mode))
        attempt("gradgradcheck", lambda: _gradcheck(torch.autograd.gradgradcheck, call, gradcheck_fast_mode))
        attempt("forward AD", lambda: _gradcheck(torch.autograd.gradcheck, call, gradcheck_fast_mode,
                                                 check_forward_ad=True, check_batched_forward_grad=True,
                                                 check_backward_ad=False, check_undefined_grad=False))
        attempt("batched grad", lambda: _gradcheck(torch.autograd.gradcheck, call, gradcheck_fast_mode,
                                                   check_batched_grad=True))
        attempt("forward over reverse", lambda: _gradcheck(torch.autograd.gradgradcheck, call, gradcheck_fast_mode,
                                                           check_fwd_over_rev=True, check_rev_over_rev=False,
                                                           check_undefined_grad=False))
        attempt("reentrant", lambda: _reentrant(_Call(fn, sample), grad_seed))
        attempt("torch.func", lambda: _torch_func(_Call(fn, sample), grad_seed))
        if "opcheck" in checks or "ops ran" in checks:
            recorder = _RecordOps()
            try:
                with recorder:
                    _outputs_and_grads(_Call(fn, sample), grad_seed)
            except Exception as err:  # the call itself failed: both checks fail with it
                for name in ("opcheck", "ops ran"):
                    if name in checks:
                        record(name, False, _first_line(err))
            else:
                if recorder.calls or isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                    attempt("opcheck", lambda: _opcheck(fn, sample, recorder.calls))
                if expected_ops:
                    attempt("ops ran", lambda: _ops_ran(expected_ops, recorder.calls))
        attempt("compile", lambda: _compile(fn, sample))
        attempt("inputs unchanged", lambda: _inputs_unchanged(fn, sample))
        attempt("no_grad", lambda: _no_grad(fn, sample))
        if "vs reference" in checks and reference is not None:
            for dtype in (torch.float64, *[d for d in dtypes if d != torch.float64]):
                dtype_name = str(dtype).removeprefix("torch.")
                try:
                    ulps = float64_ulps if dtype == torch.float64 else floor_ulps
                    error, passed, detail = _vs_reference(fn, reference, baseline, sample, dtype, ulps, grad_seed)
                except Exception as err:  # a check reports its failure and the battery goes on
                    record("vs reference", False, _first_line(err), dtype_name)
                else:
                    record("vs reference", passed, detail, dtype_name, error)
    return report


def _gradcheck(checker, call: _Call, fast_mode: bool, **modes: bool) -> Optional[str]:
    inputs = call.inputs
    if not inputs:
        return "no differentiable inputs"
    checker(call, tuple(inputs), fast_mode=fast_mode, **modes)
    return "fast mode" if fast_mode else None


def _is_refusal(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from, as gradcheck wraps them) is a
    refusal of the mode: NotImplementedError, or PyTorch's own for a Function it
    cannot transform."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, NotImplementedError) or any(words in str(err) for words in _TORCH_REFUSALS):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _differentiable_outputs(call: _Call, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in _tensors(call(*values)) if t.is_floating_point() and t.requires_grad]


def _reentrant(call: _Call, grad_seed: int) -> Optional[str]:
    inputs = call.inputs
    outputs = _differentiable_outputs(call, inputs)
    if not inputs or not outputs:
        return "no differentiable inputs or outputs"
    generator = torch.Generator().manual_seed(grad_seed)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
                for t in outputs]
    first = torch.autograd.grad(outputs, inputs, upstream, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    for index, (a, b) in enumerate(zip(first, second)):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a.nan_to_num(), b.nan_to_num())):
            difference = "one is None" if a is None or b is None else f"max difference {_max_abs(a, b):.3g}"
            raise AssertionError(f"the gradient of input {index} differs between two backward passes ({difference})")
    return None


def _torch_func(call: _Call, grad_seed: int) -> Optional[str]:
    inputs = [t.detach() for t in call.inputs]
    if not inputs:
        return "no differentiable inputs"
    generator = torch.Generator().manual_seed(grad_seed)

    def draw(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)

    weights = [draw(t) for t in _tensors(call(*inputs)) if t.is_floating_point()]

    def projection(*values):
        outputs = [t for t in _tensors(call(*values)) if t.is_floating_point()]
        return sum(((o * w).sum() for o, w in zip(outputs, weights)), inputs[0].new_zeros(()))

    # PyTorch's reverse mode of the same function: the gradient, and a Hessian-vector product.
    leaves = [t.clone().requires_grad_() for t in inputs]
    direction = [draw(t) for t in inputs]
    with torch.enable_grad():
        value = projection(*leaves)
        if not value.requires_grad:
            return "no differentiable outputs"
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
        hvp = torch.autograd.grad(grads, leaves, direction, allow_unused=True)
    hvp = [h if h is not None else torch.zeros_like(x) for h, x in zip(hvp, leaves)]
    argnums = tuple(range(len(inputs)))

    def agree(what: str, got, want) -> None:
        for index, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w.detach(), equal_nan=True,
                                       msg=lambda text, i=index: f"{what}, input {i}: {text}")

    agree("torch.func.grad", torch.func.grad(projection, argnums=argnums)(*inputs), grads)
    agree("torch.func.jacfwd", torch.func.jacfwd(projection, argnums=argnums)(*inputs), grads)
    _, got_hvp = torch.func.jvp(torch.func.grad(projection, argnums=argnums), tuple(inputs), tuple(direction))
    agree("jvp of torch.func.grad (Hessian-vector product)", got_hvp, hvp)
    # vmap over two nearby points against a call at each.
    batched = [torch.stack([t, t + 0.01 * draw(t)]) for t in inputs]
    floating = lambda *values: tuple(t for t in _tensors(call(*values)) if t.is_floating_point())  # noqa: E731
    mapped = torch.func.vmap(floating)(*batched)
    for element in range(2):
        agree(f"torch.func.vmap, element {element}", [m[element] for m in mapped],
              floating(*[b[element] for b in batched]))
    return None


def _opcheck(fn, sample: Sample, calls: Mapping[torch._ops.OpOverload, tuple]) -> Optional[str]:
    checked = []
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in sample.args)
        torch.library.opcheck(fn, args, dict(sample.kwargs))
        checked.append(str(fn))
    for op, (args, kwargs) in calls.items():
        torch.library.opcheck(op, args, kwargs)
        checked.append(op.name())
    return ", ".join(dict.fromkeys(checked))


def _ops_ran(expected: Sequence[str], calls: Mapping[torch._ops.OpOverload, tuple]) -> Optional[str]:
    ran = {op.name().split(".")[0] for op in calls}
    missing = [name for name in expected if name not in ran]
    if missing:
        raise AssertionError(f"{', '.join(missing)} did not run; ran: {', '.join(sorted(ran)) or 'no registered op'}")
    return ", ".join(sorted(ran))


def _compile(fn, sample: Sample) -> Optional[str]:
    import torch._dynamo

    # A fresh cache: otherwise calls past dynamo's recompile limit would silently run eagerly.
    torch._dynamo.reset()
    call = _Call(fn, sample)
    expected_out, expected_grads = _outputs_and_grads(call, 0)
    compiled = _Call(fn, sample)
    compiled_fn = torch.compile(compiled.__call__, fullgraph=True)
    inputs = compiled.inputs
    outputs = [t for t in _tensors(compiled_fn(*inputs)) if t.is_floating_point()]
    generator = torch.Generator().manual_seed(0)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
                for t in outputs]
    grads = [None] * len(inputs)
    differentiable = [(o, g) for o, g in zip(outputs, upstream) if o.requires_grad]
    if differentiable and inputs:
        grads = torch.autograd.grad([o for o, _ in differentiable], inputs, [g for _, g in differentiable],
                                    allow_unused=True)
    for got, want in zip(outputs, expected_out):
        torch.testing.assert_close(got.detach(), want, equal_nan=True)
    for got, want in zip(grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got, want, equal_nan=True)
    return None


def _inputs_unchanged(fn, sample: Sample) -> Optional[str]:
    call = _Call(fn, sample)
    tensors = [t for t in (*call.args, *call.kwargs.values(), *call.params) if isinstance(t, torch.Tensor)]
    before = [t.detach().clone() for t in tensors]
    _outputs_and_grads(call, 0)
    for index, (t, saved) in enumerate(zip(tensors, before)):
        torch.testing.assert_close(t.detach(), saved, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda text, i=index: f"tensor argument {i} changed: {text}")
    return None


def _no_grad(fn, sample: Sample) -> Optional[str]:
    call = _Call(fn, sample)
    expected = [t.detach() for t in _tensors(call(*call.inputs))]
    with torch.no_grad():
        got = _tensors(call(*call.inputs))
    for t, want in zip(got, expected):
        if t.requires_grad or t.grad_fn is not None:
            raise AssertionError("an output under torch.no_grad() requires grad")
        torch.testing.assert_close(t, want, equal_nan=True)
    return None
