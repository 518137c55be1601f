#!/usr/bin/env bash
# The GPU proof (issue 16): build the CUDA extension for the visible card, run every CUDA test,
# compute-sanitizer over each op, and the GPU benchmarks, in at most 8 minutes; the record goes
# to $OUT/gpu_check_cuda.json (see scripts/gpu_check.py for the steps and their budgets).
#
#   bash scripts/gpu_check.sh              on the GPU machine (python3 there holds CUDA torch)
#   bash scripts/gpu_check.sh --dry-run    on a CPU machine: every step with tiny sizes (CI)
#   bash scripts/gpu_check.sh --wheel dist/cu130/landscape_ext-*.whl
#                                          test the CUDA wheel built on the CPU machine
#                                          (scripts/build_wheels.sh) instead of building here; the
#                                          record names its build torch and this machine's torch
#
# Peer tools for the benchmarks travel as wheels in .whl/ (pure Python, installed without
# network into /tmp/site); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python && " $* " == *" --dry-run "* ]]; then PYTHON=.venv/bin/python
  else PYTHON="$(command -v python3 || command -v python)"; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
