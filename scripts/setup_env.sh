#!/usr/bin/env bash
# Shared set-up of the README commands (scripts/test.sh, scripts/report_example.sh).
# Source it, then call:   setup_env            (always re-runs the editable build; ninja rebuilds
#                                               only what changed)
#                         setup_env --if-needed (skips the build when landscape_ext and the
#                                               landscape-lab CLI already import cleanly)
#
# Creates .venv beside this checkout if it does not exist, installs torch (TORCH_SPEC, default
# torch==2.13.0), the build, test and lab requirements, and builds landscape-ext in place
# (editable, [test,lab] extras, console script landscape-lab) against that torch. Leaves the venv
# activated in the calling shell. Must be sourced from the repository root.

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
  python -m pip install -q numpy scipy pytest ninja "setuptools>=64" wheel matplotlib tqdm scikit-learn
  echo "== building landscape-ext against torch $(python -c 'import torch; print(torch.__version__)')"
  python -m pip install -q --no-build-isolation -e ".[test,lab]"
}
