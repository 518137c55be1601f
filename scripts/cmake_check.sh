#!/usr/bin/env bash
# The CMake developer build and its C++ tests (ctest), in a build folder outside the checkout.
# Needs the environment's python with torch (run after scripts/test.sh, or with .venv active).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LANDSCAPE_EXT_CMAKE_BUILD:-$(mktemp -d)/lx-cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$(command -v python)"
cmake --build "$build" -j2
ctest --test-dir "$build" --output-on-failure
