#!/usr/bin/env bash
# Compiles and links myext's CUDA kernels on a machine without a GPU, and checks
# that they register with the dispatcher. Nothing built here can run a kernel:
# this catches compile, link and registration errors only (scripts/gpu_check.sh
# runs the kernels on a GPU).
#
# Uses a venv of its own, .venv-cuda (a CUDA build of torch, about 5 GB), and
# builds in a copy of the source tree, so the development build is untouched.
#
# With --run-tests it then runs the test suite against that build, so that the
# suite is also checked under torch 2.14.1 (its GPU tests skip here).
#
# Environment: PYTHON (python3), CUDA_HOME (/usr/local/cuda),
# TORCH_CUDA_ARCH_LIST ("8.0;9.0"), MAX_JOBS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv="$repo/.venv-cuda"
torch_version=2.14.1

fail() {
  echo "check_cuda_build: FAIL: $*" >&2
  exit 1
}

start=$SECONDS
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(not (torch.__version__.startswith('$torch_version') and torch.version.cuda))" 2>/dev/null; then
  echo "check_cuda_build: installing torch==$torch_version (CUDA build), ninja, numpy into $venv"
  "${PYTHON:-python3}" -m venv "$venv"
  log=$(mktemp)
  if ! "$venv/bin/pip" install --disable-pip-version-check -q "torch==$torch_version" ninja numpy >"$log" 2>&1; then
    cat "$log" >&2
    fail "pip install failed"
  fi
  rm -f "$log"
fi
install_s=$((SECONDS - start))

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
# Tracked files and new ones not ignored: what a commit of this tree would hold.
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$workdir"

start=$SECONDS
if ! (
  cd "$workdir"
  export MYEXT_BUILD_CUDA=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" PATH="$venv/bin:$PATH"
  "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1
); then
  grep -E -B2 -A12 "error|FAILED" "$workdir/build.log" | head -n 200 >&2
  fail "the CUDA build failed (errors above)"
fi
compile_s=$((SECONDS - start))

op_count=$(
  cd "$workdir"
  "$venv/bin/python" - <<'EOF'
import glob
import importlib.util
import sys

import torch

# Loaded by file, not through the myext package: this checks the extension
# alone (its libraries resolve, its kernels register), whatever state the
# Python side is in.
(path,) = glob.glob("myext/_C*.so")
spec = importlib.util.spec_from_file_location("myext._C", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))

# Every op of csrc/myext.cpp's schemas (the Triton ones register from Python, not here).
ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("myext::"))
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
if not ops or missing:
    sys.exit(f"no CUDA kernel registered for: {', '.join(missing) or 'any op'}")
print(len(ops))
EOF
) || fail "myext._C does not load or lacks CUDA kernels"

echo "check_cuda_build: PASS: CUDA kernels of all ${op_count} ops compile, link and register" \
  "(torch $torch_version, archs ${TORCH_CUDA_ARCH_LIST:-8.0;9.0}; install ${install_s} s, compile ${compile_s} s)"

if [ "${1:-}" = "--run-tests" ]; then
  log=$(mktemp)
  # torch 2.14.1 brings its own triton; the rest of requirements.txt, less the torch pin.
  if ! grep -v -E '^(torch|triton)==' requirements.txt | "$venv/bin/pip" install --disable-pip-version-check -q -r /dev/stdin >"$log" 2>&1; then
    cat "$log" >&2
    fail "installing the test requirements failed"
  fi
  rm -f "$log"
  (cd "$workdir" && PYTHONPATH="$workdir" "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2) ||
    fail "the test suite failed under torch $torch_version"
  echo "check_cuda_build: PASS: test suite under torch $torch_version"
fi
