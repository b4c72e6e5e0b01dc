"""``myext bench``: a --quick run end to end, and the parts it is built from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import myext
from myext import bench, machine, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_table_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    json_path, plot_dir = tmp_path / "bench.json", tmp_path / "plots"
    # --no-compile: compiling the baseline would take most of a minute here.
    proc = subprocess.run(
        [sys.executable, "-m", "myext.bench", "--quick", "--no-compile", "--device", "cpu",
         "--json", str(json_path), "--plot-dir", str(plot_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    lines = proc.stdout.splitlines()
    assert lines[0].startswith("myext bench on ")
    assert lines[1].startswith("limits: copy ")
    assert lines[2].split()[:5] == ["op", "pass", "shape", "provider", "median"]
    rows = [line.split() for line in lines if line.startswith(bench.OPS)]
    backends = bench.default_backends(torch.device("cpu"))
    providers = [f"myext-{b}" for b in backends] + ["eager"]
    cases = sum(len(shapes) for op in bench.OPS for _, shapes in registry.get(op).benchmark.quick_sweep) * len(bench.PASSES)
    assert len(rows) == cases * len(providers)
    assert {row[3] for row in rows} == set(providers)

    results = json.loads(json_path.read_text())
    assert results["schema"] == bench.JSON_SCHEMA
    assert results["machine"]["device"] == "cpu"
    assert results["dtype"] == "float32"
    for limits in (results["limits"], results["limits_end"]):
        assert limits["copy_GBps"] > 0 and limits["matmul_GFLOPps"] > 0
    assert results["providers"] == providers
    # The GEMM library each float32 shape class was measured to run faster on, as recorded.
    assert any(line.startswith("GEMMs at the end: ") for line in lines)
    if torch.backends.mkldnn.is_available():
        choices = results["machine"]["gemm_choices"]
        assert choices and all(set(c) == set(machine.GemmChoice._fields) for c in choices)
        assert all(c["onednn"] == (c["onednn_seconds"] < 0.95 * c["aten_seconds"]) for c in choices)
    assert len(results["results"]) == len(rows)
    for row in results["results"]:
        assert row["op"] in bench.OPS and row["pass"] in bench.PASSES
        work = registry.get(row["op"]).benchmark.work
        assert row["unit"] == work(row["shape"], row["pass"] == "fwd+bwd", torch.float32)[1]
        assert 0 < row["min_ms"] <= row["median_ms"]
        assert len(row["times_ms"]) >= bench.QUICK_SETTINGS.min_repeats
        assert row["rate"] > 0 and row["percent_of_limit"] > 0
        assert row["peak_extra_bytes"] >= row["peak_alloc_bytes"] >= 0
        assert row["peak_rss_bytes"] is None or row["peak_extra_bytes"] >= row["peak_rss_bytes"] >= 0
        assert row["speedup_vs_eager"] > 0
        assert row["speedup_vs_compile"] is None
    for op in bench.OPS:
        png = plot_dir / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_backend_is_an_error():
    assert bench.main(["--quick", "--device", "cpu", "--backend", "cuda"]) == 2


def test_myext_command_runs_bench():
    from myext import cli

    assert cli.main(["bench", "--quick", "--device", "cpu", "--backend", "cuda"]) == 2


def test_peak_memory_sees_tensor_allocations():
    rows, classes = 256, 1000
    nbytes = rows * classes * 4

    def two_live_buffers():
        a = torch.ones(rows, classes)
        b = torch.ones(rows, classes)
        del a, b

    peak = bench.peak_memory(two_live_buffers, torch.device("cpu"))
    assert 2 * nbytes <= peak["peak_alloc_bytes"] < 2 * nbytes + 65536
    assert peak["peak_extra_bytes"] >= peak["peak_alloc_bytes"]


@pytest.mark.skipif(bench.peak_rss_bytes(lambda: None) is None, reason="needs /proc/self/clear_refs (Linux)")
def test_peak_rss_sees_memory_outside_the_allocator():
    nbytes = 64 << 20

    def touch_a_numpy_buffer():  # numpy's memory bypasses torch's allocator
        np.ones(nbytes // 8)

    assert bench.peak_rss_bytes(touch_a_numpy_buffer) >= 0.9 * nbytes


def test_cross_entropy_backward_holds_only_the_gradient():
    """myext's fwd+bwd needs one N x C buffer, the gradient; eager holds three.
    The gradient is above 32 MB, where myext's kernels allocate it themselves."""
    rows, classes = 2048, 4096
    nbytes = rows * classes * 4
    tensors = bench.inputs("cross_entropy", dict(N=rows, C=classes), device="cpu", dtype=torch.float32,
                           requires_grad=True)
    cpu = torch.device("cpu")
    mine = bench.peak_memory(bench.make_call(bench.op_impl("cross_entropy", "myext-cpp"), tensors, True), cpu)
    eager = bench.peak_memory(bench.make_call(bench.op_impl("cross_entropy", "eager"), tensors, True), cpu)
    # Peak RSS is a lower bound: pages an earlier test left resident are not counted again.
    assert 0.9 * nbytes <= mine["peak_extra_bytes"] < 1.5 * nbytes
    assert eager["peak_extra_bytes"] >= 2 * nbytes


def test_work_per_call():
    shape = dict(N=4, K=5, M=6)
    assert bench.work_per_call("linear_relu", shape, False, torch.float32) == (240, "GFLOP/s")
    assert bench.work_per_call("linear_relu", shape, True, torch.float32) == (720, "GFLOP/s")
    shape = dict(N=4, C=10)
    assert bench.work_per_call("cross_entropy", shape, False, torch.float32) == (4 * 10 * 4 + 32, "GB/s")
    assert bench.work_per_call("cross_entropy", shape, True, torch.bfloat16) == (3 * 4 * 10 * 2 + 64, "GB/s")


def test_default_backends_leave_out_the_reference_and_the_interpreter():
    backends = bench.default_backends(torch.device("cpu"))
    assert "torch" not in backends and "triton" not in backends
    assert set(backends) <= set(myext.available_backends("cpu"))


def test_compile_provider_matches_eager():
    """The compile baseline computes what eager does (one tiny case; compiling takes seconds)."""
    torch._dynamo.reset()
    x, w, b = (t for t in bench.inputs("linear_relu", dict(N=8, K=16, M=4), device="cpu", dtype=torch.float32,
                                        requires_grad=False).values())
    torch.testing.assert_close(bench.op_impl("linear_relu", "compile")(x, w, b), bench.op_impl("linear_relu", "eager")(x, w, b))


def test_missing_alternative_is_skipped_with_its_reason(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # its import now fails
    providers = bench.op_providers("linear_cross_entropy", ["cpp"])
    assert providers == ["myext-cpp", "eager", "compile", "compile-autochunk"]
    assert capsys.readouterr().out == ("linear_cross_entropy: cut-cross-entropy skipped, "
                                       "cut-cross-entropy not installed: pip install cut-cross-entropy\n")


def test_no_compile_leaves_out_every_compiled_provider(capsys):
    assert bench.op_providers("linear_cross_entropy", ["cpp"], compiled=False) == ["myext-cpp", "eager"]
    assert bench.op_providers("linear_relu", ["cpp"], compiled=False) == ["myext-cpp", "eager"]
    assert capsys.readouterr().out == ""


def _linear_cross_entropy_step(provider, N, H, V):
    """The loss and the input and weight gradients of one step of ``provider``, on the
    same inputs for every provider."""
    torch.manual_seed(0)
    x, w, target = bench.inputs("linear_cross_entropy", dict(N=N, H=H, V=V), device="cpu", dtype=torch.float32,
                                requires_grad=True).values()
    loss = bench.op_impl("linear_cross_entropy", provider)(x, w, target)
    return (loss, *torch.autograd.grad(loss, (x, w)))


def test_auto_chunker_chunks_the_step_and_only_its_own():
    """The auto-chunker provider computes eager's step in chunks; the config it compiles
    with does not reach the plain compile provider."""
    from torch._inductor import config, metrics

    torch._dynamo.reset()
    metrics.reset()
    shape = dict(N=256, H=16, V=8192)  # logits of 2M elements, above the chunker's threshold
    # A graph from Inductor's caches (an earlier run's) skips the passes that count chunking.
    with torch.compiler.config.patch(force_disable_caches=True):
        torch.testing.assert_close(_linear_cross_entropy_step("compile-autochunk", **shape),
                                   _linear_cross_entropy_step("eager", **shape))
        assert metrics.num_auto_chunking == 1
        _linear_cross_entropy_step("compile", **shape)
    assert metrics.num_auto_chunking == 1 and not config.auto_chunker.enable


def test_cut_cross_entropy_matches_eager():
    pytest.importorskip("cut_cross_entropy")
    torch._dynamo.reset()
    shape = dict(N=64, H=32, V=100)
    torch.testing.assert_close(_linear_cross_entropy_step("cut-cross-entropy", **shape),
                               _linear_cross_entropy_step("eager", **shape))
