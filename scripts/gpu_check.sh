#!/usr/bin/env bash
# One command for a GPU machine with no network (torch with CUDA, nvcc, ninja, pytest
# and, optionally, triton already there): builds myext with its CUDA kernels in place,
# runs the GPU tests, then times the cuda and triton backends against PyTorch eager and
# torch.compile (`myext bench --device cuda`, the same harness and work model as on the
# CPU, with the ops' GPU sizes). Each step has a time limit; the whole run stays under
# 10 minutes (120 + 300 + 100 + 80 s).
#
# Environment: PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0: only the GPU at hand, to
# save build time), MAX_JOBS (16), TEST_WORKERS (8).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export MYEXT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
# The in-place build is imported from the repository root, also by `python -m myext`.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
# step NAME SECONDS COMMAND...: runs COMMAND under a time limit and reports how it went.
step() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name"
  if timeout "$limit" "$@"; then
    echo "=== $name: ok ($((SECONDS - start)) s)"
  else
    echo "=== $name: FAILED (exit $?, $((SECONDS - start)) s, limit $limit s)"
    status=1
    return 1
  fi
}

build_log=$(mktemp)
if ! step "build (archs $TORCH_CUDA_ARCH_LIST)" 120 \
    bash -c '"$0" setup.py build_ext --inplace >"$1" 2>&1' "$python" "$build_log"; then
  tail -n 60 "$build_log"
  exit 1
fi
# Most of the tests' time is Triton compiling and autotuning kernels for each new
# shape, on the CPU: pytest-xdist spreads it over the cores where it is installed.
workers=()
if "$python" -c "import xdist" 2>/dev/null; then
  workers=(-n "${TEST_WORKERS:-8}")
fi
step "GPU tests" 300 "$python" -m pytest tests -q -m gpu -p no:cacheprovider -rfE "${workers[@]}"
# One step per group of ops, each with its own JSON: a slow op's limit does not take the
# others' results with it.
step "benchmark (linear_relu, cross_entropy)" 100 "$python" -m myext bench --device cuda \
  --op linear_relu --op cross_entropy --json docs/benchmarks/gpu.json
step "benchmark (linear_cross_entropy)" 80 "$python" -m myext bench --device cuda \
  --op linear_cross_entropy --json docs/benchmarks/gpu_linear_cross_entropy.json
exit $status
