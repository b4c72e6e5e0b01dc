"""myext.machine: the CPU and the paths myext's CPU kernels take, as check and bench print them."""

import torch

from myext import machine


def test_describe_cpu_names_the_build_and_the_gemm_path(monkeypatch):
    info = machine.describe_cpu()
    assert info["myext_cpu_capability"] in {"AVX512", "AVX2", "DEFAULT"}
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert info["cpu"]
    if torch.backends.mkldnn.is_available():
        assert info["gemm"].startswith("oneDNN for float32 from 8 MFLOP")
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert "switched off" in machine.describe_cpu()["gemm"]
    line = machine.cpu_description()
    assert info["cpu"] in line and info["myext_cpu_capability"] in line

