#!/usr/bin/env bash
# Build the wheel and test it the way users get it: installed into a fresh venv (no checkout on
# sys.path), then scripts/wheel_smoke.py (import, build_info, HessianOperator + eigsh against a
# dense Hessian, the ops against their references, landscape-lab --help), and the sdist's
# contents. Run from anywhere with the dev venv's python on PATH (it builds with that torch).
#
#   bash scripts/wheel_test.sh              (torch for the fresh venv: WHEEL_TEST_TORCH,
#                                            default: the version the build venv has)
# Exit status non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
BUILD_TORCH="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
TEST_TORCH="${WHEEL_TEST_TORCH:-torch==$BUILD_TORCH}"

echo "== building the wheel and the sdist (torch $BUILD_TORCH)"
# the object files of scripts/test.sh's build (same sources, same flags): only the link runs
LANDSCAPE_EXT_BUILD_DIR="${LANDSCAPE_EXT_BUILD_DIR:-build/ext-$(python -c 'import torch; print(torch.__version__)')}" \
  python -m pip wheel -q --no-build-isolation --no-deps . -w "$WORK/dist"
python - "$ROOT" "$WORK/dist" <<'PY'
# every package of the source tree must be in the wheel (the wheel once held 24 of 74 modules)
import pathlib, sys, zipfile
root, dist = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(dist.glob("*.whl"))
names = set(zipfile.ZipFile(wheel).namelist())
want = {str(p.relative_to(root)) for p in (root / "landscape_ext").rglob("*.py")}
want |= {str(p.relative_to(root / "python")) for p in (root / "python" / "landscape_lab").rglob("*.py")}
missing = sorted(w for w in want if w not in names)
so = [n for n in names if n.endswith(".so")]
print(f"wheel {wheel.name}: {len(want) - len(missing)} of {len(want)} modules, {so}, "
      f"{wheel.stat().st_size / 1e6:.1f} MB")
if missing or len(so) != 1 or "abi3" not in wheel.name:
    sys.exit(f"wheel_test: missing modules {missing[:10]}, libraries {so}")
PY
python scripts/check_stable_abi.py "$WORK"/dist/*.whl
python setup.py -q sdist -d "$WORK/sdist" >/dev/null 2>&1
python - "$ROOT" "$WORK/sdist" <<'PY'
# the sdist: every module, every kernel source and header
import pathlib, sys, tarfile
root, dist = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
sdist = next(dist.glob("*.tar.gz"))
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
want = {str(p.relative_to(root)) for d in ("landscape_ext", "python", "csrc")
        for p in (root / d).rglob("*") if p.suffix in (".py", ".h", ".cuh", ".cpp", ".cu")
        and "__pycache__" not in p.parts}
missing = sorted(want - names)
print(f"sdist {sdist.name}: {len(want) - len(missing)} of {len(want)} sources and headers")
if missing:
    sys.exit(f"wheel_test: the sdist lacks {missing[:10]}")
PY

echo "== fresh venv with $TEST_TORCH"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$TEST_TORCH" numpy scipy 2>&1 | grep -v "^WARNING: Location" || true
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WORK"/dist/*.whl
cp scripts/wheel_smoke.py "$WORK/"
(cd "$WORK" && PATH="$WORK/venv/bin:$PATH" "$WORK/venv/bin/python" wheel_smoke.py)
echo "wheel_test: passed"
