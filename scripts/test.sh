#!/usr/bin/env bash
# Set up everything the tests need (first run) and run them:   bash scripts/test.sh [pytest args]
#
# Creates .venv beside this checkout if it does not exist, installs torch (TORCH_SPEC, default
# torch==2.13.0), the build and test requirements, builds landscape-ext in place against that
# torch, and runs pytest. Re-running reuses the environment and rebuilds only what changed.
# (The set-up lives in scripts/setup_env.sh, shared with scripts/report_example.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
setup_env

echo "== running tests"
python -m pytest -q "$@"
