#!/usr/bin/env bash
# The README's main command: set up (first run) and write a landscape report of the built-in
# example (an MLP trained briefly on scikit-learn's digits):
#
#   bash scripts/report_example.sh [extra landscape-lab report options]
#
# Output: out/report/report.md, out/report/figures/*.png, out/report/results.json (choose another
# directory with --out DIR; see `landscape-lab report --help`). Set-up is shared with
# scripts/test.sh (scripts/setup_env.sh); it is skipped when the build already imports cleanly
# (force it with SETUP_FORCE=1).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
if [ "${SETUP_FORCE:-0}" = 1 ]; then setup_env; else setup_env --if-needed; fi

echo "== landscape-lab report --example digits-mlp --out out/report $*"
if command -v landscape-lab >/dev/null; then
  landscape-lab report --example digits-mlp --out out/report "$@"
else
  python -m landscape_lab report --example digits-mlp --out out/report "$@"
fi
