"""Check that a built landscape-ext library depends on torch through its stable C ABI only.

    python scripts/check_stable_abi.py dist/landscape_ext-*.whl      (or a path to _C*.so)

Fails (exit 1) when the library references a C++ symbol of libtorch or c10 (a mangled at::,
c10::, torch:: or caffe2:: name: such a symbol ties the binary to the torch release it was
built against), needs libtorch_python or a Python-version-specific libpython, or was not tagged
abi3. Prints the C symbols of torch it uses, counted, and the libraries it needs.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

_CXX_TORCH = re.compile(r"^(?:const )?(?:c10|at|torch|caffe2)::")


def _library(path: Path, tmp: Path) -> Path:
    if path.suffix != ".whl":
        return path
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".so")]
        if len(names) != 1:
            sys.exit(f"check_stable_abi: {path.name} holds {len(names)} libraries: {names}")
        return Path(zf.extract(names[0], tmp))


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        lib = _library(path, Path(tmp))
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], check=True,
                                   capture_output=True, text=True).stdout.split()
        symbols = [s for s in undefined if s not in ("U", "w", "v")]
        demangled = subprocess.run(["c++filt"], input="\n".join(symbols), check=True,
                                   capture_output=True, text=True).stdout.splitlines()
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                            subprocess.run(["readelf", "-d", str(lib)], check=True,
                                           capture_output=True, text=True).stdout)
    cxx = [d for d in demangled if _CXX_TORCH.match(d)]
    shim = [s for s in symbols if s.startswith(("aoti_torch_", "torch_"))]
    bad_libs = [n for n in needed if n.startswith(("libtorch_python", "libpython"))]
    print(f"{lib.name}: {len(shim)} torch C-shim symbols, {len(cxx)} torch C++ symbols; "
          f"needs {', '.join(needed)}")
    for d in cxx[:20]:
        print(f"  C++ symbol of torch: {d}")
    for n in bad_libs:
        print(f"  needs {n}: ties the binary to one torch or one Python")
    if not lib.name.endswith(".abi3.so"):
        print(f"  {lib.name} is not an abi3 module")
    return 1 if cxx or bad_libs or not lib.name.endswith(".abi3.so") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
