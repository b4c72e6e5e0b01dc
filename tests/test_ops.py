"""The conformance suite every registered op gets, on every backend and device here.

It iterates myext.registry and runs myext.testing's battery on each op's registered
samples: gradcheck and gradgradcheck in float64, opcheck of the dispatcher ops that ran,
that the named backend's own ops ran, that no input changed, the no-grad path,
torch.compile(fullgraph=True), and agreement with the plain-PyTorch reference against
a float64 ground truth in float64, float32 and bfloat16 (our error at most about twice
the reference's own in that dtype). A new op gets all of it by registering.
"""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import myext
from myext import backends, registry, testing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT64_CHECKS = ["gradcheck", "gradgradcheck", "forward AD", "batched grad", "forward over reverse", "reentrant",
                  "torch.func", "opcheck", "ops ran", "inputs unchanged", "no_grad", "vs reference"]


def _op_backend_device(with_samples: bool = False):
    params = []
    for spec in registry.specs():
        for device in DEVICES:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            for backend in backends.available_backends(device, op=spec.name):
                if not with_samples:
                    params.append(pytest.param(spec.name, backend, device, id=f"{spec.name}-{backend}-{device}",
                                               marks=marks))
                    continue
                for index, sample in enumerate(spec.samples("cpu")):
                    params.append(pytest.param(spec.name, backend, device, index, marks=marks,
                                               id=f"{spec.name}-{backend}-{device}-{sample.name}"))
    return params


def _checked(op: str, backend: str):
    return functools.partial(registry.get(op).function, backend=backend)


def _own_ops(op: str, backend: str) -> list[str]:
    if backend == "torch":
        return []
    return [backends.qualified_name(name, backend) for name in registry.get(op).ops_always_run()]


@pytest.mark.parametrize("op,backend,device,index", _op_backend_device(with_samples=True))
def test_float64_battery(op, backend, device, index):
    spec = registry.get(op)
    sample = spec.samples(device)[index]
    checks = [c for c in FLOAT64_CHECKS if backend != "torch" or c not in ("opcheck", "ops ran")]
    # Interpreted, a Triton kernel's call takes tens of milliseconds: element by element,
    # gradcheck and gradgradcheck took most of the suite's time (up to 30 s a sample).
    interpreted = backend == "triton" and device == "cpu"
    report = testing.check(_checked(op, backend), spec.reference, [sample], checks=checks, dtypes=(),
                           expected_ops=_own_ops(op, backend), gradcheck_fast_mode=interpreted)
    report.assert_ok()
    assert {r.check for r in report} == set(checks)
    # Every op runs every autograd mode: none is refused.
    assert report.refused() == []


@pytest.mark.parametrize("op,backend,device,index", _op_backend_device(with_samples=True))
def test_autograd_modes_match_pytorch(op, backend, device, index):
    """Forward-mode AD, jacfwd, jacrev and vmap of each op give PyTorch's own answers
    (the spec's baseline, built of PyTorch's ops, under the same transforms)."""
    spec = registry.get(op)
    sample = spec.samples(device)[index]
    inputs = [a for a in sample.args if isinstance(a, torch.Tensor) and a.requires_grad]
    inputs += [v for v in sample.kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def bound(fn):
        def call(*values):
            values = iter(values)
            args = [next(values) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in sample.args]
            kwargs = {k: next(values) if isinstance(v, torch.Tensor) and v.requires_grad else v
                      for k, v in sample.kwargs.items()}
            return fn(*args, **kwargs)
        return call

    ours, pytorchs = bound(_checked(op, backend)), bound(spec.baseline)
    primals = [t.detach() for t in inputs]
    tangents = [torch.randn_like(t) for t in primals]
    argnums = tuple(range(len(primals)))
    for transform in (lambda f: torch.func.jvp(f, tuple(primals), tuple(tangents)),
                      lambda f: torch.func.jacfwd(f, argnums=argnums)(*primals),
                      lambda f: torch.func.jacrev(f, argnums=argnums)(*primals),
                      lambda f: torch.func.vmap(f)(*[torch.stack([t, 2 * t]) for t in primals])):
        torch.testing.assert_close(transform(ours), transform(pytorchs))
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        got, want = (torch.autograd.forward_ad.unpack_dual(f(*duals)).tangent for f in (ours, pytorchs))
    assert got is not None
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op,backend,device", _op_backend_device())
def test_agreement_with_the_reference(op, backend, device):
    spec = registry.get(op)
    report = testing.check(_checked(op, backend), spec.reference, spec.accuracy_samples(device),
                           checks=["vs reference"], dtypes=(torch.float32, torch.bfloat16),
                           baseline=spec.baseline)
    report.assert_ok()
    assert {r.dtype for r in report} == {"float64", "float32", "bfloat16"}


@pytest.mark.parametrize("op,backend,device", [p for p in _op_backend_device() if p.values[1] != "torch"])
def test_compile_fullgraph(op, backend, device):
    spec = registry.get(op)
    report = testing.check(_checked(op, backend), None, spec.samples(device)[-1:], checks=["compile"])
    report.assert_ok()
    assert [r.check for r in report] == ["compile"]


# A fresh interpreter whose first call of an op is compiled (fullgraph=True): the probes
# run beside the trace, not in it, and the function compiles once.
FIRST_CALL_COMPILED = """
import sys, torch, myext
assert not myext.backends._surveyed, "import myext probed the backends"
assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules, "import myext imported them"
graphs = []
def counting(gm, example_inputs):
    graphs.append(gm)
    return gm.forward
@torch.compile(fullgraph=True, backend=counting)
def loss(x, w, t):
    return myext.cross_entropy(myext.linear_relu(x, w, backend=BACKEND), t, backend=BACKEND)
x, w, t = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4), torch.tensor([0, 4, 2])
for _ in range(2):
    out = loss(x, w, t)
    out.backward()
torch.testing.assert_close(out, torch.nn.functional.cross_entropy(torch.relu(x @ w.t()), t))
assert len(graphs) == 1, len(graphs)
print(myext.available_backends("cpu"))
"""


@pytest.mark.parametrize("backend", [None, "torch", "cpp", "triton"])
def test_import_probes_nothing_and_a_compiled_first_call_probes(backend):
    """`import myext` probes no backend; the first call may be compiled with fullgraph=True.
    Triton runs interpreted here, so that it is probed on any machine that has it."""
    if backend == "cpp" and "cpp" not in backends.available_backends("cpu"):
        pytest.skip("no C++ CPU kernels in this build")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1") if backend == "triton" else None
    result = subprocess.run([sys.executable, "-c", f"BACKEND = {backend!r}" + FIRST_CALL_COMPILED],
                            capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    if backend == "triton":
        assert result.stdout.strip() == "['cpp', 'triton', 'torch']"


def test_vmap_over_an_empty_batch_is_refused_with_the_op_named():
    logits, target = torch.randn(0, 4, 5, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="myext::cross_entropy_forward under vmap"):
        torch.func.vmap(lambda x, t: myext.cross_entropy(x, t, backend="cpp"))(logits, target)
