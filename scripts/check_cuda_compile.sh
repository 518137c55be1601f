#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc (-c only: no GPU, no link) against the headers of the
# torch that `python` on PATH imports, for sm_80 and sm_90. Catches CUDA compile errors on a
# machine without a GPU or a CUDA build of torch (the CPU wheel still ships ATen/c10 CUDA headers).
#
#   usage: scripts/check_cuda_compile.sh        (activate the venv first; runs from any cwd)
#   env:   NVCC (default: $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else nvcc on PATH)
#          CUDA_ARCHS (default: "80 90")
# Exit status is non-zero on any compile error (or a missing nvcc/python/torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [[ -z "${NVCC:-}" ]]; then
  if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC="$(command -v nvcc || true)"; fi
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set CUDA_HOME or NVCC)" >&2
  exit 2
fi

# torch's headers go in as system headers: their own warnings (e.g. C++20 bit-field initialisers
# in torch >= 2.13 under -std=c++17) are not ours to fix and would hide the ones that are.
TORCH_INCLUDES="$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")"
TORCH_VERSION="$(python -c "import torch; print(torch.__version__)")"
read -r -a ARCHS <<< "${CUDA_ARCHS:-80 90}"

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu sources" >&2
  exit 2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# A CPU wheel of torch lacks the one generated c10 CUDA header; in a CUDA build it only defines
# C10_CUDA_BUILD_SHARED_LIBS (which matters on Windows). Supply that stand-in when it is missing;
# the search order puts torch's own copy first where it exists.
SHIM=()
if ! python -c "import os, sys, torch.utils.cpp_extension as e; sys.exit(0 if any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in e.include_paths()) else 1)"; then
  mkdir -p "$TMP/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h"
  SHIM=(-isystem "$TMP/shim")
fi

GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done

echo "check_cuda_compile: $("$NVCC" --version | tail -n 1), torch $TORCH_VERSION, archs ${ARCHS[*]}"
status=0
for src in "${SOURCES[@]}"; do
  obj="$TMP/$(basename "${src%.cu}").o"
  # Same macros and flags as setup.py's CUDA build (-O3 -std=c++17 --expt-relaxed-constexpr, the
  # stable-ABI target TORCH_TARGET_VERSION = 2.10), so what compiles here compiles there.
  # shellcheck disable=SC2086
  if "$NVCC" -c "$src" -o "$obj" \
      -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
      "${GENCODE[@]}" \
      -DLANDSCAPE_EXT_WITH_CUDA=1 -DUSE_CUDA -DTORCH_TARGET_VERSION=0x020a000000000000 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      $TORCH_INCLUDES "${SHIM[@]}" -I"$CUDA_HOME/include" -Icsrc; then
    echo "ok    $src"
  else
    echo "FAIL  $src" >&2
    status=1
  fi
done
exit $status
