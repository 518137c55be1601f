#!/usr/bin/env bash
# Build the release wheels: one CPU wheel and one CUDA wheel per CUDA major version, each tagged
# cp310-abi3 (any CPython >= 3.10) and loading under any torch >= 2.10 of the matching kind (torch's
# stable ABI). Neither holds libtorch nor the CUDA runtime: they load the ones of the installed
# torch (libc10, libtorch_cpu; + libtorch_cuda, libc10_cuda and libcudart.so.<major> for CUDA).
#
#   bash scripts/build_wheels.sh [OUT]          (OUT default: dist)
#     OUT/cpu/landscape_ext-*.whl     built with the dev venv's python (a CPU torch; or any torch
#                                     with LANDSCAPE_EXT_CUDA=0)
#     OUT/cu<XY>/landscape_ext-*.whl  built with CUDA_PYTHON, a python whose torch is a CUDA build
#                                     (default: ~/.cache/landscape-ext/venvs/torch-2.14.1, the
#                                     venv scripts/wheel_matrix.sh creates), for the archs of
#                                     TORCH_CUDA_ARCH_LIST (default 8.0;8.6;9.0+PTX)
#   env: CUDA_PYTHON, CUDA_WHEEL=0 (CPU wheel only), CUDA_HOME (default: the toolkit of the
#        real nvcc on PATH, wrappers followed)
#
# A cu12 wheel: the same with a CUDA 12 torch and toolkit, e.g.
#   python3 -m venv /tmp/cu12 && /tmp/cu12/bin/pip install torch==2.10.0 (PyPI's 2.10 is cu128)
#   CUDA_PYTHON=/tmp/cu12/bin/python CUDA_HOME=/usr/local/cuda-12.8 bash scripts/build_wheels.sh
# (the CUDA major of torch and of nvcc must match: libcudart.so.12 vs .13). This machine has only
# the CUDA 13.0 toolkit, so only cpu/ and cu130/ were built here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)"

build() {  # build <python> <out folder> [env...]
  local py=$1 out=$2
  shift 2
  rm -rf "$out" && mkdir -p "$out"
  local tv
  tv="$("$py" -c 'import torch; print(torch.__version__)')"
  echo "== $(basename "$out") wheel with torch $tv"
  env "$@" LANDSCAPE_EXT_BUILD_DIR="build/ext-wheel-$(basename "$out")-$tv" \
    "$py" -m pip wheel -q --no-build-isolation --no-deps . -w "$out"
  python scripts/check_stable_abi.py "$out"/*.whl
}

build python "$OUT/cpu" LANDSCAPE_EXT_CUDA=0
if [ "${CUDA_WHEEL:-1}" != 0 ]; then
  CUDA_PYTHON=${CUDA_PYTHON:-"$HOME/.cache/landscape-ext/venvs/torch-2.14.1/bin/python"}
  if [ ! -x "$CUDA_PYTHON" ]; then
    echo "build_wheels: no CUDA_PYTHON at $CUDA_PYTHON (a python whose torch is a CUDA build);" \
         "CUDA_WHEEL=0 builds the CPU wheel only" >&2
    exit 2
  fi
  "$CUDA_PYTHON" -m pip install -q ninja setuptools wheel 2>&1 | grep -v "^WARNING" || true
  cu="$("$CUDA_PYTHON" -c 'import torch; print((torch.version.cuda or "").replace(".", ""))')"
  [ -n "$cu" ] || { echo "build_wheels: $CUDA_PYTHON has a CPU torch" >&2; exit 2; }
  build "$CUDA_PYTHON" "$OUT/cu$cu" LANDSCAPE_EXT_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;9.0+PTX}" MAX_JOBS="${MAX_JOBS:-2}"
fi
echo
echo "| wheel | size |"
echo "|---|---|"
for w in "$OUT"/*/*.whl; do
  rel="$(basename "$(dirname "$w")")/$(basename "$w")"
  echo "| $rel | $(du -h "$w" | cut -f1) |"
done
