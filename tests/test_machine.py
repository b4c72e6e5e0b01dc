"""myext.machine: the CPU and the paths myext's CPU kernels take, as check and bench print them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import myext
from myext import machine


def test_describe_cpu_names_the_build_and_the_gemm_path(monkeypatch):
    info = machine.describe_cpu()
    assert info["myext_cpu_capability"] in {"AVX512", "AVX2", "DEFAULT"}
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert info["cpu"]
    if torch.backends.mkldnn.is_available():
        assert info["gemm"].startswith("ATen or oneDNN, the faster measured per shape class and dtype")
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert "switched off" in machine.describe_cpu()["gemm"]
    line = machine.cpu_description()
    assert info["cpu"] in line and info["myext_cpu_capability"] in line



# Each build of the CPU kernels in a process of its own (the ISA is chosen at import):
# every op's forward and backward in float64, float32 and bfloat16, as JSON.
_RUN_EVERY_OP = """
import json, torch, myext
results = {"capability": myext._cpu.CAPABILITY}
for dtype in (torch.float64, torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(129, 300, generator=g, dtype=torch.float64) / 17).to(dtype).requires_grad_()
    b = torch.randn(129, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, 129, (37,), generator=g)
    losses = [myext.linear_relu(x, w, b).sum(),
              myext.cross_entropy(x * 3, t.clamp(max=299), label_smoothing=0.1, softcap=5.0),
              myext.linear_cross_entropy(x, w, t, linear_bias=b, lse_square_scale=1e-3, chunk_size=16)]
    for name, loss in zip(("linear_relu", "cross_entropy", "linear_cross_entropy"), losses):
        grads = torch.autograd.grad(loss, (x, w, b), allow_unused=True)
        results[f"{name} {dtype}"] = [loss.double().tolist()] + [
            g.double().flatten().tolist() for g in grads if g is not None]
print(json.dumps(results))
"""


def _levels_here() -> list[str]:
    supported = myext._cpu._torch_level()
    return list(myext._cpu.LEVELS[:myext._cpu.LEVELS.index(supported) + 1])


def _run_at(level: str) -> dict:
    env = {**os.environ, "MYEXT_CPU_CAPABILITY": level, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _RUN_EVERY_OP], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_isa_build_loads_and_agrees():
    """Each ISA's build that this CPU runs is the one loaded when asked for, and gives
    every op's results within rounding of the others' (their exponentials and sums differ
    in the last bits, not in what they compute)."""
    runs = {level: _run_at(level) for level in _levels_here()}
    for level, found in runs.items():
        assert found.pop("capability") == level.upper()
    reference = runs.pop("default")
    tolerances = {"float64": 1e-12, "float32": 1e-4, "bfloat16": 3e-2}
    for level, found in runs.items():
        for case, values in found.items():
            tol = tolerances[case.split("torch.")[-1]]
            for actual, expected in zip(values, reference[case]):
                torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=tol, atol=tol,
                                           msg=lambda m: f"{level} against default, {case}: {m}")


def test_an_isa_the_cpu_lacks_or_a_bad_name_is_refused():
    env = {**os.environ, "MYEXT_CPU_CAPABILITY": "sse9"}
    run = subprocess.run([sys.executable, "-c", "import myext"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "MYEXT_CPU_CAPABILITY must be one of" in run.stderr
    # A CPU without AVX-512, as torch sees one where ATEN_CPU_CAPABILITY lowers it.
    env.update(MYEXT_CPU_CAPABILITY="avx512", ATEN_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", "import myext"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "this CPU runs at most default" in run.stderr


def test_the_gemm_policy_comes_from_the_environment_and_a_bad_one_is_refused():
    code = "import myext.machine as m; print(m.cpu_gemm_policy(), '|', m.describe_cpu()['gemm'])"
    env = {**os.environ, "MYEXT_CPU_GEMM": "aten"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if torch.backends.mkldnn.is_available():
        assert run.stdout.strip() == "aten | ATen ($MYEXT_CPU_GEMM=aten)"
    env["MYEXT_CPU_GEMM"] = "mkl"
    run = subprocess.run([sys.executable, "-c", "import myext"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "MYEXT_CPU_GEMM must be one of ['probe', 'aten', 'onednn'], got 'mkl'" in run.stderr


def test_set_cpu_gemm_policy_checks_its_argument(cpu_gemm_policy):
    with pytest.raises(ValueError, match="policy must be one of"):
        machine.set_cpu_gemm_policy("mkl")
    cpu_gemm_policy("onednn")
    assert machine.cpu_gemm_policy() == "onednn" and machine.cpu_gemm_choices() == []


def test_aten_cpu_capability_lowers_the_build_too():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", "import myext; print(myext._cpu.CAPABILITY)"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "DEFAULT", run.stderr


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_each_build_uses_no_wider_registers_than_its_isa():
    """What makes one build run on any x86-64 CPU: the default build and the schema
    module use no AVX register (ymm) and the AVX2 build no AVX-512 one (zmm), so that a
    CPU without them never meets their instructions."""
    package = Path(myext.__file__).parent
    forbidden = {"_C": ("ymm", "zmm"), "_cpu_default": ("ymm", "zmm"), "_cpu_avx2": ("zmm",)}
    for name, registers in forbidden.items():
        (library,) = package.glob(f"{name}.*so")
        code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        for register in registers:
            assert f"%{register}" not in code, f"{library.name} uses {register} registers"
