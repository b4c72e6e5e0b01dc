"""Builds myext._C (the op schemas, and the CUDA kernels where CUDA is at hand) and the
C++ CPU kernels once per vector ISA, myext._cpu_default, _cpu_avx2 and _cpu_avx512 (x86-64;
elsewhere the default build only), of which myext/_cpu.py loads the one the CPU runs, as
ATen's own CPU kernels choose at run time: a wheel built on any machine runs on any CPU
torch runs on.

Environment variables:
  MYEXT_BUILD_CUDA=1/0       force the CUDA sources in or out (default: in when torch
                             is a CUDA build and nvcc is found).
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for (default "8.0;9.0").
  MAX_JOBS                   parallel compile jobs (default: the machine's cores).
"""

import glob
import os
import platform

from setuptools import find_packages, setup
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


def cpu_capabilities() -> list[str]:
    """The ISAs the CPU kernels are built for: all three on x86-64, else the default."""
    return list(CPU_CAPABILITY_FLAGS) if platform.machine().lower() in ("x86_64", "amd64") else ["default"]


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


# -ffp-contract=off: a product written once rounds the same everywhere (a fused
# multiply-add would not), so that terms meant to cancel do, e.g. the gradient of a row
# of one class is exactly 0; the vector code asks for its fmadds itself. -g0: debug info
# makes the compile about 40% slower. No -std: torch's build helper adds the standard its
# headers need (C++20 from torch 2.14 on).
COMMON_CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fdiagnostics-color=always"]


def schema_extension():
    """myext._C: the schemas (csrc/myext.cpp) and, in a CUDA build, the CUDA kernels."""
    sources = [os.path.join("csrc", "myext.cpp")]
    extra_compile_args = {"cxx": list(COMMON_CXX_FLAGS)}
    kwargs = {}
    if not want_cuda():
        return cpp_extension.CppExtension("myext._C", sources, extra_compile_args=extra_compile_args,
                                          py_limited_api=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    include_flags, kwargs = cublaslt_build_options()
    extra_compile_args["cxx"] += include_flags
    extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"] + include_flags
    return cpp_extension.CUDAExtension("myext._C", sources, extra_compile_args=extra_compile_args,
                                       py_limited_api=True, **kwargs)


def cpu_kernel_extension(capability: str):
    """myext._cpu_<capability>: every csrc/cpu source compiled for that ISA.

    Each source is compiled through a one-line file of its own under build/ that
    includes it, so that each ISA's objects have paths of their own (setuptools names an
    object after its source) and a rebuild recompiles only what changed.
    """
    module = f"_cpu_{capability}"
    wrapper_dir = os.path.join("build", "cpu_kernels", capability)
    os.makedirs(wrapper_dir, exist_ok=True)
    sources = []
    for source in sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))):
        wrapper = os.path.join(wrapper_dir, os.path.basename(source))
        text = f'#include "{os.path.join(ROOT, source)}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    # -fopenmp: at::parallel_for is inline code over OpenMP; compiled without it, its
    # pragmas are ignored and every CPU kernel runs on one thread. The library it links
    # is torch's own libgomp.so.1, already loaded: one OpenMP runtime.
    cxx_flags = COMMON_CXX_FLAGS + ["-fopenmp", f"-DMYEXT_CPU_MODULE={module}"] + CPU_CAPABILITY_FLAGS[capability]
    return cpp_extension.CppExtension(f"myext.{module}", sources, extra_compile_args={"cxx": cxx_flags},
                                      extra_link_args=["-fopenmp"], py_limited_api=True)


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    # The folder triton_ops/ installs as the package myext_triton_ops: a top-level package
    # named triton_ops could collide with another project's. (In a checkout, the link
    # myext_triton_ops -> triton_ops gives the same name to PYTHONPATH=<checkout> runs.)
    packages=find_packages(ROOT, include=["myext", "myext.*"]) + ["myext_triton_ops"],
    package_dir={"myext_triton_ops": "triton_ops"},
    ext_modules=[schema_extension()] + [cpu_kernel_extension(c) for c in cpu_capabilities()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
