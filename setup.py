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


def cublaslt_build_options():
    """Compile flags and link options for cuBLASLt (the CUDA kernels call it directly).

    The CUDA toolkit's own headers and library are used where it has them. Otherwise
    those of the nvidia wheels that CUDA builds of torch install (site-packages/nvidia/
    cu13 or, for CUDA 12, nvidia/cublas): their headers are searched after the
    toolkit's (-isystem), so that the toolkit's runtime headers still match its nvcc;
    a library with no unversioned link name (the wheels') is linked by file name, with
    an rpath for running outside a torch process that already loaded it.
    """
    import torch

    toolkit = cpp_extension.CUDA_HOME or ""
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    wheel_roots = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*")))

    include_flags = []
    toolkit_includes = [os.path.join(toolkit, "include"),
                        os.path.join(toolkit, "targets", "x86_64-linux", "include")]
    if not any(os.path.exists(os.path.join(d, "cublasLt.h")) for d in toolkit_includes):
        for root in wheel_roots:
            if os.path.exists(os.path.join(root, "include", "cublasLt.h")):
                include_flags = ["-isystem", os.path.join(root, "include")]
                break

    lib_dirs = [os.path.join(toolkit, "lib64"), os.path.join(toolkit, "lib")]
    lib_dirs += [os.path.join(root, "lib") for root in wheel_roots]
    for lib_dir in lib_dirs:
        if os.path.exists(os.path.join(lib_dir, "libcublasLt.so")):
            return include_flags, {"library_dirs": [lib_dir], "libraries": ["cublasLt"]}
    for lib_dir in lib_dirs:
        found = sorted(glob.glob(os.path.join(lib_dir, "libcublasLt.so.*")))
        if found:
            name = os.path.basename(found[0])
            return include_flags, {"extra_link_args": [f"-L{lib_dir}", f"-l:{name}", f"-Wl,-rpath,{lib_dir}"]}
    # Let the linker search its default paths and say what is missing.
    return include_flags, {"libraries": ["cublasLt"]}


def extension():
    sources = [os.path.join("csrc", "myext.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std: torch's build helper adds the standard its headers need (C++20 from
    # torch 2.14 on). -g0: debug info makes the compile about 40% slower.
    # -ffp-contract=off: a product written once rounds the same everywhere (a fused
    # multiply-add would not), so that terms meant to cancel do, e.g. the gradient of
    # a row of one class is exactly 0; the vector code asks for its fmadds itself.
    # -fopenmp: at::parallel_for is inline code over OpenMP; compiled without it, its
    # pragmas are ignored and every CPU kernel runs on one thread. The library it
    # links is torch's own libgomp.so.1, already loaded: one OpenMP runtime.
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-fdiagnostics-color=always"]
    cxx_flags += CPU_CAPABILITY_FLAGS[detect_cpu_capability()]
    extra_compile_args = {"cxx": cxx_flags}
    kwargs = {"extra_link_args": ["-fopenmp"]}
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        include_flags, cuda_kwargs = cublaslt_build_options()
        kwargs.update(cuda_kwargs)
        extra_compile_args["cxx"] = cxx_flags + include_flags
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"] + include_flags
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
