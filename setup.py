"""Builds myext._C: the C++ CPU kernels, and the CUDA kernels where CUDA is at hand.

Environment variables:
  MYEXT_BUILD_CUDA=1/0       force the CUDA sources in or out (default: in when torch
                             is a CUDA build and nvcc is found).
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for (default "8.0;9.0").
  MYEXT_CPU_CAPABILITY       avx512, avx2 or default: the vector ISA of the CPU kernels
                             (default: the best this machine supports, since the
                             extension is built where it runs).
  MAX_JOBS                   parallel compile jobs (default: the machine's cores).
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Flags that select ATen's at::vec implementation; each also names the
# instruction sets the compiler may use for it.
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
             "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def detect_cpu_capability() -> str:
    requested = os.environ.get("MYEXT_CPU_CAPABILITY")
    if requested:
        if requested not in CPU_CAPABILITY_FLAGS:
            raise ValueError(f"MYEXT_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)}, "
                             f"got {requested!r}")
        return requested
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags):
        return "avx512"
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2"
    return "default"


def want_cuda() -> bool:
    flag = os.environ.get("MYEXT_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = [os.path.join("csrc", "myext.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17", "-fdiagnostics-color=always", "-DPy_LIMITED_API=0x030a0000"]
    cxx_flags += CPU_CAPABILITY_FLAGS[detect_cpu_capability()]
    extra_compile_args = {"cxx": cxx_flags}
    kwargs = {}
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        kwargs["libraries"] = ["cublas", "cublasLt"]
        ext_class = cpp_extension.CUDAExtension
    else:
        ext_class = cpp_extension.CppExtension
    return ext_class(
        "myext._C",
        sources,
        extra_compile_args=extra_compile_args,
        py_limited_api=True,
        **kwargs,
    )


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
