"""scripts/gpu_check.py's parsing: sanitizer reports per op family, the kernel list, ninja's log.
(The whole script runs in CI as `bash scripts/gpu_check.sh --dry-run`.)"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))

import gpu_check  # noqa: E402

MEMCHECK = """========= COMPUTE-SANITIZER
== op krylov
========= Invalid __global__ read of size 4 bytes
=========     at krylov_pass_kernel<float, float, 8, (Mode)0>(PassParams)+0x1c0
========= Invalid __global__ read of size 4 bytes
== op hvp
   xent_hvp torch.float32 N=7 C=10 k=3: rel err 1.0e-07 ok
== op sketch
========= ERROR SUMMARY: 2 errors
"""
RACECHECK = """== op hvp
========= Error: Race reported between Write access at xent_hvp_kernel+0x90
========= Warning: Race reported between Read access at xent_hvp_kernel+0x40
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""


def test_sanitizer_reports_are_counted_per_family():
    mem = gpu_check.parse_sanitizer(MEMCHECK)
    assert mem["per_family"]["krylov"] == {"errors": 2, "warnings": 0}
    assert mem["per_family"]["hvp"]["errors"] == 0 and mem["per_family"]["sketch"]["errors"] == 0
    assert mem["errors"] == 2 and mem["summary_count"] == 2
    race = gpu_check.parse_sanitizer(RACECHECK)
    assert race["per_family"]["hvp"] == {"errors": 1, "warnings": 1}
    assert race["summary_count"] == 2
    clean = gpu_check.parse_sanitizer("== op krylov\n========= ERROR SUMMARY: 0 errors\n")
    assert clean["errors"] == 0 and clean["summary_count"] == 0


def test_every_cuda_kernel_is_listed_for_the_sanitizer_filter():
    names = gpu_check.kernel_names()
    src = os.path.join(HERE, "..", "csrc", "cuda")
    text = "".join(open(os.path.join(src, f)).read() for f in os.listdir(src) if f.endswith(".cu"))
    assert len(names) == text.count("__global__") and len(names) >= 6
    assert {"xent_hvp_kernel", "krylov_pass_kernel", "direct_sketch_kernel"} <= set(names)


def test_ninja_log_gives_seconds_per_source(tmp_path, monkeypatch):
    build = tmp_path / "build" / "temp.linux-x86_64-cpython-312"
    build.mkdir(parents=True)
    (build / ".ninja_log").write_text(
        "# ninja log v5\n100\t51100\t0\t/x/build/temp/csrc/cuda/krylov.o\tabc\n"
        "0\t30000\t0\t/x/build/temp/csrc/module.o\tdef\n")
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    assert gpu_check.ninja_compile_times() == {"krylov": 51.0, "module": 30.0}
