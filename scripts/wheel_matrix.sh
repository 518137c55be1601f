#!/usr/bin/env bash
# One wheel, many torches: build the wheel once (with the dev venv's torch), install it into a
# venv per torch release, and in each run the op tests, the engine smoke test
# (scripts/wheel_smoke.py) and the README's main example (`landscape-lab report --example
# digits-mlp --quick`), from a folder outside the checkout. Prints a table; exit status 1 if any
# cell failed.
#
#   bash scripts/wheel_matrix.sh [WHEEL]
#     WHEEL            test this wheel instead of building one
#   env:
#     MATRIX_TORCHES   torch releases (default "2.10.0 2.12.0 2.13.0 2.14.1")
#     MATRIX_CACHE     where the venvs live and are reused (default ~/.cache/landscape-ext/venvs;
#                      a CUDA torch is 5-6 GB installed: keep it outside the checkout)
#     MATRIX_EXAMPLE=0 skips the README example (about 45 s per torch on 2 cores)
#     MATRIX_JSON      also write the table as JSON to this file
#
# A venv is created on first use: torch==<release> (PyPI's build: the CUDA one on Linux x86-64,
# which runs on the CPU here) with numpy, scipy, pytest and the lab extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCHES=${MATRIX_TORCHES:-"2.10.0 2.12.0 2.13.0 2.14.1"}
CACHE=${MATRIX_CACHE:-"$HOME/.cache/landscape-ext/venvs"}
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

if [ $# -ge 1 ]; then
  WHEEL="$(readlink -f "$1")"
else
  BUILD_TORCH="$(python -c 'import torch; print(torch.__version__)')"
  echo "== building the wheel once, with torch $BUILD_TORCH"
  LANDSCAPE_EXT_BUILD_DIR="build/ext-$BUILD_TORCH" \
    python -m pip wheel -q --no-build-isolation --no-deps . -w "$WORK/dist"
  WHEEL="$(ls "$WORK"/dist/*.whl)"
fi
BUILT_WITH="$(python - "$WHEEL" <<'PY'
import re, sys, zipfile
zf = zipfile.ZipFile(sys.argv[1])
name = next(n for n in zf.namelist() if n.endswith("_build_facts.py"))
print(re.search(r"BUILT_TORCH_VERSION = '(.+?)'", zf.read(name).decode()).group(1))
PY
)"
echo "== wheel $(basename "$WHEEL") (built with torch $BUILT_WITH)"

# the op tests run from a copy, so that no checkout is on sys.path
mkdir -p "$WORK/tests"
cp tests/conftest.py tests/_op_common.py tests/test_ops.py tests/test_krylov.py tests/test_hvp.py \
   tests/test_sketch.py scripts/wheel_smoke.py "$WORK/tests/"

ROWS=()
status=0
for version in $TORCHES; do
  venv="$CACHE/torch-$version"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "== creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$version" numpy scipy pytest
  fi
  "$venv/bin/python" -m pip install -q matplotlib tqdm scikit-learn 2>&1 | grep -v "^WARNING" || true
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL"
  runtime="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "== torch $runtime"
  log="$WORK/tests-$version.log"
  t0=$SECONDS
  if (cd "$WORK/tests" && "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        test_ops.py test_krylov.py test_hvp.py test_sketch.py > "$log" 2>&1); then tests=ok; else tests=FAIL; status=1; fi
  tests_line="$(grep -E "passed|failed|error" "$log" | tail -n 1)"
  if (cd "$WORK/tests" && PATH="$venv/bin:$PATH" "$venv/bin/python" wheel_smoke.py \
        > "$WORK/smoke-$version.log" 2>&1); then smoke=ok; else smoke=FAIL; status=1; fi
  example=skipped
  if [ "${MATRIX_EXAMPLE:-1}" != 0 ]; then
    if (cd "$WORK" && "$venv/bin/landscape-lab" report --example digits-mlp --quick \
          --out "$WORK/report-$version" > "$WORK/example-$version.log" 2>&1) \
        && [ -s "$WORK/report-$version/report.md" ]; then example=ok; else example=FAIL; status=1; fi
  fi
  [ "$tests" = ok ] || tail -n 30 "$log"
  [ "$smoke" = ok ] || cat "$WORK/smoke-$version.log"
  [ "$example" != FAIL ] || tail -n 20 "$WORK/example-$version.log"
  ROWS+=("| $runtime | $tests ($tests_line) | $smoke | $example | $((SECONDS - t0)) |")
done

echo
echo "wheel $(basename "$WHEEL"), built once with torch $BUILT_WITH"
echo
echo "| torch | op tests (test_ops, test_krylov, test_hvp, test_sketch) | smoke test | README example | seconds |"
echo "|---|---|---|---|---|"
for row in "${ROWS[@]}"; do echo "$row"; done
if [ -n "${MATRIX_JSON:-}" ]; then
  printf '%s\n' "${ROWS[@]}" | python -c '
import json, sys
rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in sys.stdin if line.strip()]
keys = ["torch", "op_tests", "smoke", "readme_example", "seconds"]
json.dump({"wheel": sys.argv[1], "built_with_torch": sys.argv[2],
           "rows": [dict(zip(keys, r)) for r in rows]}, open(sys.argv[3], "w"), indent=1)
' "$(basename "$WHEEL")" "$BUILT_WITH" "$MATRIX_JSON"
fi
exit $status
