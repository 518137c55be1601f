#!/usr/bin/env bash
# Set up everything the tests need (first run) and run them:   bash scripts/test.sh [pytest args]
#
# Creates .venv beside this checkout if it does not exist, installs torch (TORCH_SPEC, default
# torch==2.13.0), the build and test requirements, builds landscape-ext in place against that
# torch, and runs pytest. Re-running reuses the environment and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC"
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q numpy scipy pytest ninja "setuptools>=64" wheel matplotlib tqdm scikit-learn
echo "== building landscape-ext against torch $(python -c 'import torch; print(torch.__version__)')"
python -m pip install -q --no-build-isolation -e ".[test,lab]"

echo "== running tests"
python -m pytest -q "$@"
