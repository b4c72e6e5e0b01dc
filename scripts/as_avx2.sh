#!/usr/bin/env bash
# Runs a command on the AVX2 code paths of every library that dispatches on the CPU,
# as an AVX2-only CPU (AMD EPYC Zen 3) runs it, on a machine with AVX-512:
#
#   bash scripts/as_avx2.sh python -m pytest -n 2
#
# myext's kernels follow torch's capability (ATEN_CPU_CAPABILITY); oneDNN, MKL and
# OpenBLAS have their own switches, and NumPy (the Triton interpreter's arithmetic) its
# own. What it cannot change is the CPU's microarchitecture and memory: timings taken
# under it are the AVX2 code's on this CPU, not an AVX2 CPU's.
#
# Inductor gets a cache of its own: with torch 2.13 a graph compiled under one
# capability and loaded from the cache under another computes wrong values
# (relu(addmm) of 8x16 by 16x4: off by 4.1, where a fresh compile is exact).
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2
export ONEDNN_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export OPENBLAS_CORETYPE=Haswell
export NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_avx2_${USER:-$(id -u)}}"
exec "$@"
