#!/usr/bin/env bash
# The CMake developer build and its C++ tests (ctest), in a build folder outside the checkout, then
# the built module checked the way setup.py's is: a stable-ABI binary (no C++ symbol of libtorch,
# no libtorch_python) that Python imports as landscape_ext._C and whose ops run.
# Needs the environment's python with torch (run after scripts/test.sh, or with .venv active).
# LANDSCAPE_EXT_CMAKE_BUILD=<dir> keeps the build there (default: a temporary folder, removed).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
build=${LANDSCAPE_EXT_CMAKE_BUILD:-$scratch/lx-cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')

echo "== cmake: configure, build (-j2), ctest in $build"
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$(command -v python)"
cmake --build "$build" -j2
ctest --test-dir "$build" --output-on-failure

# Install into a scratch copy of the Python package (never into the checkout: its
# landscape_ext/_C*.so belongs to `pip install -e .`), which PYTHONPATH puts ahead of the editable
# install.
echo "== cmake: install into a scratch package, check the module"
stage=$scratch/stage
mkdir -p "$stage"
cp -R landscape_ext "$stage/"
find "$stage/landscape_ext" \( -name '_C*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cmake --install "$build" --prefix "$stage"
module=$(ls "$stage"/landscape_ext/_C*.so)
echo "installed $module"

status=0
# Only torch's extern "C" shim (aoti_torch_*, torch_*) may be referenced, never its C++ API, and
# no libtorch_python: scripts/check_stable_abi.py, the check of setup.py's wheels.
if [ -f scripts/check_stable_abi.py ]; then
  python scripts/check_stable_abi.py "$module" || status=1
else
  needed=$(readelf -d "$module" | grep NEEDED || true)
  if grep -q 'libtorch_python' <<<"$needed"; then
    echo "FAIL: $module links libtorch_python"
    status=1
  fi
  cxx_refs=$(nm -D -C --undefined-only "$module" | grep -E ' (c10|at|torch|caffe2|pybind11)::' || true)
  if [ -n "$cxx_refs" ]; then
    echo "FAIL: $module references C++ symbols of libtorch (not the stable ABI):"
    echo "$cxx_refs" | head -20
    status=1
  fi
fi
needed=$(readelf -d "$module" | grep NEEDED || true)
for lib in libc10.so libtorch.so libtorch_cpu.so; do
  grep -q "\[$lib\]" <<<"$needed" || { echo "FAIL: $module does not link $lib"; status=1; }
done

(cd "$scratch" && PYTHONPATH="$stage" python - "$stage" <<'PY') || status=1
import os
import sys

import torch

stage = sys.argv[1]
import landscape_ext  # noqa: E402

where = os.path.realpath(landscape_ext._C.__file__)
assert where.startswith(os.path.realpath(stage)), f"imported {where}, not the CMake-built module"
info = landscape_ext.build_info()
assert info["built_torch_version"] == torch.__version__, info
assert info["torch_target_version"] == "2.10" and info["stable_abi"] is True, info
assert "block_orthonormalize" in info["kernels"] and "CPU" in info["kernels"]["block_orthonormalize"], info

# the Python krylov driver over the CMake-built passes
gen = torch.Generator().manual_seed(0)
basis = torch.linalg.qr(torch.randn(301, 6, dtype=torch.float64, generator=gen))[0].T.contiguous()
block = torch.randn(3, 301, dtype=torch.float64, generator=gen)
q, c, r = landscape_ext.block_orthonormalize(basis, block, 6)
err = (block - c.T @ basis - r.T @ q).abs().max().item()
orth = (q @ basis.T).abs().max().item()
assert err < 1e-12 and orth < 1e-12, (err, orth)
print(f"import check: ok ({os.path.basename(where)}, torch {torch.__version__}, "
      f"cuda_kernels={info['cuda_kernels']}, cpu_isa_level={info['cpu_isa_level']}, "
      f"block_orthonormalize reconstruction {err:.1e})")
PY
exit $status
