#!/usr/bin/env bash
# Shared set-up of the README commands (scripts/test.sh, scripts/report_example.sh).
# Source it, then call:   setup_env            (builds landscape-ext unless the build is current)
#                         setup_env --if-needed (skips the build when landscape_ext and the
#                                               landscape-lab CLI already import cleanly)
#
# Creates .venv beside this checkout if it does not exist, installs torch (TORCH_SPEC, default
# torch==2.13.0), the build, test and lab requirements, and builds landscape-ext in place
# (editable, console script landscape-lab) against that torch. Leaves the venv activated in the
# calling shell. Must be sourced from the repository root.
#
# Fast when nothing changed: a stamp in .venv records a hash of what the build depends on (csrc/,
# setup.py, pyproject.toml, the torch version and the CUDA settings); when it matches and the
# package imports, nothing is built or installed. When something changed, the build reuses its
# object files in build/ext-<torch version> (LANDSCAPE_EXT_BUILD_DIR, read by setup.py), so ninja
# recompiles only the sources that changed.

_lx_build_key() {
  {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml
    python -c 'import torch; print(torch.__version__, torch.version.cuda)'
    echo "cuda=${LANDSCAPE_EXT_CUDA:-} arch=${TORCH_CUDA_ARCH_LIST:-} home=${CUDA_HOME:-}"
    command -v nvcc || true
  } | sha256sum | cut -d' ' -f1
}

_lx_requirements_key() {
  # (the torch version from its metadata: importing torch before numpy is there warns)
  echo "numpy scipy pytest ninja setuptools>=64 wheel matplotlib tqdm scikit-learn" \
    "$(python -c 'import importlib.metadata as m; print(m.version("torch"))')" \
    | sha256sum | cut -d' ' -f1
}

setup_env() {
  local if_needed=0
  [ "${1:-}" = "--if-needed" ] && if_needed=1
  local python=${PYTHON:-python3}
  local torch_spec=${TORCH_SPEC:-torch==2.13.0}

  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($python --version)"
    "$python" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate

  if [ "$if_needed" = 1 ] && python -c "import landscape_ext, landscape_lab.cli" 2>/dev/null \
      && command -v landscape-lab >/dev/null; then
    echo "== landscape-ext already built against torch $(python -c 'import torch; print(torch.__version__)')"
    return 0
  fi
  if ! python -c "import torch" 2>/dev/null; then
    echo "== installing $torch_spec"
    python -m pip install -q "$torch_spec"
  fi
  local req_stamp=.venv/.landscape-ext-requirements
  if [ "$(cat "$req_stamp" 2>/dev/null)" != "$(_lx_requirements_key)" ]; then
    python -m pip install -q numpy scipy pytest ninja "setuptools>=64" wheel matplotlib tqdm \
      scikit-learn
    _lx_requirements_key > "$req_stamp"
  fi

  local torch_version key stamp=.venv/.landscape-ext-build
  torch_version=$(python -c 'import torch; print(torch.__version__)')
  key=$(_lx_build_key)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] \
      && python -c "import landscape_ext, landscape_lab.cli" 2>/dev/null \
      && command -v landscape-lab >/dev/null; then
    echo "== landscape-ext is current (built against torch $torch_version; csrc/ unchanged)"
    return 0
  fi
  echo "== building landscape-ext against torch $torch_version (objects kept in build/ext-$torch_version)"
  rm -f "$stamp"
  LANDSCAPE_EXT_BUILD_DIR="build/ext-$torch_version" \
    python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$key" > "$stamp"
}
