"""The GPU proof: build, test, sanitize and benchmark every CUDA kernel in one timed run.

    bash scripts/gpu_check.sh              # on the GPU machine (see ../shared/GPU.md)
    bash scripts/gpu_check.sh --dry-run    # every step on the CPU with tiny sizes (CI runs this)

Steps run in order, each in its own process with its own time budget, inside one overall
deadline (``--budget``, 470 s by default, under the 8 minutes issue 16 allows), so a slow step
cannot eat the rest: a step past its budget is killed and recorded as ``timeout``. The record,
``$OUT/gpu_check_cuda.json`` (``gpu_check_dry.json`` for a dry run), holds ``machine``,
``build`` (seconds, per-source compile times from ninja's log, ``build_info()``), ``tests``
(passed, failed, skipped), ``sanitizer`` (errors per op family and tool), ``bench`` (each
benchmark's JSON) and ``steps`` (status, seconds and the tail of each step's log); the whole
log goes to ``$OUT/gpu_check.log``. A short table is printed last. Exit status: 0 when every
step that ran passed (benchmarks that time out count as failed steps, not as test failures).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# the test files holding CUDA cases ("-k cuda" picks them: their ids name the device) and the
# engine-on-GPU tests
TEST_FILES = ["tests/test_cuda_engine.py", "tests/test_hvp.py", "tests/test_krylov.py",
              "tests/test_sketch.py", "tests/test_mlp_hvp.py", "tests/test_ops.py"]
ERROR_LINE = re.compile(r"^=========\s+(Invalid|Error|Program hit|Uninitialized|Malloc|Leaked)")
WARNING_LINE = re.compile(r"^=========\s+Warning")


class Runner:
    """Runs the steps' commands against one deadline, teeing their output into one log."""

    def __init__(self, out_dir: str, budget_s: float):
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.log = open(os.path.join(out_dir, "gpu_check.log"), "w")
        self.only_benches: set = set()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")] + (
                            [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: List[str], budget_s: float, env: Optional[Dict] = None):
        """(returncode or None on timeout, output, seconds). The command runs in its own
        process group, so a timeout kills its children (compilers, benchmark subprocesses)."""
        timeout = max(1.0, min(budget_s, self.remaining()))
        self.log.write(f"\n===== {name}: {' '.join(cmd)} (budget {timeout:.0f} s)\n")
        self.log.flush()
        print(f"[gpu_check] {name}: {' '.join(cmd)[:160]} (budget {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(self.env, **(env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = None
        seconds = time.monotonic() - t0
        self.log.write(out or "")
        self.log.write(f"\n===== {name}: rc={rc} in {seconds:.1f} s\n")
        self.log.flush()
        return rc, out or "", seconds


def step_record(rc, out, seconds, **extra):
    status = "timeout" if rc is None else ("passed" if rc == 0 else "failed")
    return dict(status=status, returncode=rc, seconds=round(seconds, 1),
                log_tail=out[-3000:], **extra)


# ---- the steps ------------------------------------------------------------------------------------

def probe_machine(runner: Runner, cuda: bool) -> Dict:
    code = ("import json, platform, torch; print(json.dumps({'python': platform.python_version(),"
            " 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,"
            " 'cuda_available': torch.cuda.is_available(),"
            " 'device_name': torch.cuda.get_device_name() if torch.cuda.is_available() else"
            " platform.processor() or platform.machine(),"
            " 'capability': list(torch.cuda.get_device_capability()) if torch.cuda.is_available()"
            " else None, 'cpu_count': __import__('os').cpu_count()}))")
    rc, out, seconds = runner.run("machine", [PY, "-c", code], 60)
    info = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": out[-1000:]}
    for tool in ("nvcc", "compute-sanitizer", "nvidia-smi", "ninja"):
        info[tool] = shutil.which(tool)
    if cuda and info.get("nvidia-smi"):
        rc, smi, _ = runner.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,"
                                "memory.total,clocks.sm,clocks.mem", "--format=csv"], 20)
        info["nvidia_smi"] = smi.strip()
    return info


def ninja_compile_times() -> Dict[str, float]:
    """Seconds per compiled source from the build's .ninja_log (start and end in ms)."""
    times = {}
    for log in glob.glob(os.path.join(ROOT, "build", "temp*", ".ninja_log")):
        with open(log) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4 and parts[0].isdigit():
                    src = os.path.basename(parts[3]).replace(".o", "")
                    times[src] = (int(parts[1]) - int(parts[0])) / 1e3
    return times


def build(runner: Runner, machine: Dict, cuda: bool, budget_s: float) -> Dict:
    info_cmd = [PY, "-c", "import json, landscape_ext; print(json.dumps(landscape_ext.build_info()))"]
    rc, out, _ = runner.run("build_info (before)", info_cmd, 60)
    before = json.loads(out.strip().splitlines()[-1]) if rc == 0 else None
    wanted_cuda = cuda
    if getattr(runner, "wheel", None):
        # a wheel built elsewhere (the CPU machine), installed against this machine's torch
        status = "wheel" if before and (before.get("cuda_kernels") or not wanted_cuda) else \
            "failed"
        return dict(status=status, seconds=0.0, build_info=before or out, wheel=runner.wheel,
                    built_torch_version=(before or {}).get("built_torch_version"),
                    runtime_torch_version=machine.get("torch"))
    # the stable ABI: a build loads under any torch >= 2.10, so any working CUDA build is reused
    if before and before.get("stable_abi") and (before.get("cuda_kernels") or not wanted_cuda):
        return dict(status="reused", seconds=0.0, build_info=before,
                    compile_seconds=ninja_compile_times())
    env = {"MAX_JOBS": str(machine.get("cpu_count") or os.cpu_count() or 1)}
    if wanted_cuda:
        major, minor = machine["capability"]
        env.update(TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", LANDSCAPE_EXT_CUDA="1")
    rc, out, seconds = runner.run("build", [PY, "setup.py", "build_ext", "--inplace"], budget_s,
                                  env)
    record = step_record(rc, out, seconds, compile_seconds=ninja_compile_times(), env=env)
    if rc == 0:
        rc2, out2, _ = runner.run("build_info", info_cmd, 60)
        record["build_info"] = json.loads(out2.strip().splitlines()[-1]) if rc2 == 0 else out2
        record["ld_preload"] = check_error_path(runner)
    return record


def check_error_path(runner: Runner) -> Optional[str]:
    """An op's error message formats numbers in our C++ runtime; where the build's libstdc++
    clashes with torch's, that segfaults (../shared/GPU.md). Detect it once and, if so, preload
    the compiler's libstdc++ for every later step."""
    code = ("import torch, landscape_ext\ntry:\n    torch.ops.landscape_ext.xent_hvp(torch.ones(2, 3), "
            "torch.zeros(3, dtype=torch.long), torch.ones(1, 2, 3))\nexcept RuntimeError as e:\n"
            "    print('error path ok:', str(e)[:120])")
    rc, out, _ = runner.run("error path", [PY, "-c", code], 60)
    if rc is not None and rc < 0 and shutil.which("g++"):
        lib = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True,
                             text=True).stdout.strip()
        runner.env["LD_PRELOAD"] = lib
        return lib
    return None


def run_tests(runner: Runner, cuda: bool, budget_s: float) -> Dict:
    junit = os.path.join(runner.out_dir, "junit.xml")
    cmd = [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-k", "cuda",
           f"--junitxml={junit}"] + TEST_FILES
    if cuda and _has_module("xdist"):
        cmd += ["-n", "4"]
    rc, out, seconds = runner.run("tests", cmd, budget_s)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed_ids = []
    if os.path.exists(junit):
        for case in ET.parse(junit).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                counts["failed" if "failure" in kinds else "errors"] += 1
                failed_ids.append(f"{case.get('classname')}::{case.get('name')}")
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        os.remove(junit)
    # pytest exits 5 when "-k cuda" selects nothing (a CPU dry run without CUDA cases)
    return step_record(0 if rc == 5 else rc, out, seconds, failed_tests=failed_ids[:50],
                       **counts)


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def kernel_names() -> List[str]:
    names = set()
    for src in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        with open(src) as f:
            text = f.read()
        for match in re.finditer(r"__global__", text):
            head = re.sub(r"__launch_bounds__\([^)]*\)", "", text[match.end():match.end() + 400])
            name = re.search(r"\b([A-Za-z_]\w*)\s*\(", head)
            if name:
                names.add(name.group(1))
    return sorted(names)


def parse_sanitizer(out: str) -> Dict:
    """Errors and warnings per op family, from the "== op <family>" markers gpu_sanitize.py
    prints before each family (the sanitizer reports a kernel's errors before the script's
    synchronize returns, so they land in that family's section)."""
    per_family: Dict[str, Dict[str, int]] = {}
    family = "startup"
    for line in out.splitlines():
        marker = re.match(r"^== op (\w+)", line)
        if marker:
            family = marker.group(1)
            continue
        bucket = per_family.setdefault(family, {"errors": 0, "warnings": 0})
        if ERROR_LINE.match(line):
            bucket["errors"] += 1
        elif WARNING_LINE.match(line):
            bucket["warnings"] += 1
    summary = re.findall(r"(?:ERROR SUMMARY|RACECHECK SUMMARY): (\d+) (?:errors?|hazards?)", out)
    return {"per_family": per_family, "summary_count": sum(int(s) for s in summary),
            "errors": sum(b["errors"] for b in per_family.values())}


def sanitize(runner: Runner, cuda: bool, budget_s: float) -> Dict:
    workload = [PY, "scripts/gpu_sanitize.py", "--device", "cuda" if cuda else "cpu"]
    sanitizer = shutil.which("compute-sanitizer")
    if not (cuda and sanitizer):
        rc, out, seconds = runner.run("sanitizer workload (no sanitizer)", workload, budget_s)
        return step_record(rc, out, seconds, tools={}, note="skipped: " + (
            "no GPU" if not cuda else "compute-sanitizer not found") + "; workload ran plainly")
    filters = []
    for name in kernel_names():
        filters += ["--kernel-name", f"kns={name}"]
    tools, status, total, logs = {}, "passed", 0.0, []
    for tool in ("memcheck", "racecheck"):
        cmd = [sanitizer, "--tool", tool, "--print-limit", "50"] + filters + workload
        rc, out, seconds = runner.run(f"sanitizer {tool}", cmd, budget_s / 2)
        total += seconds
        logs.append(out[-1500:])
        parsed = parse_sanitizer(out)
        parsed.update(returncode=rc, seconds=round(seconds, 1))
        tools[tool] = parsed
        if rc is None:
            status = "timeout"
        elif rc != 0 or parsed["errors"] or parsed["summary_count"]:
            status = "failed" if status == "passed" else status
    return dict(status=status, seconds=round(total, 1), tools=tools,
                errors=sum(max(t["errors"], t["summary_count"]) for t in tools.values()),
                log_tail="\n".join(logs))


def benchmarks(cuda: bool, results_dir: str) -> List[Dict]:
    """(name, command, budget s) of each benchmark: the GPU presets, or tiny CPU ones."""
    dev = "cuda" if cuda else "cpu"
    out = ["--out", results_dir]
    if cuda:
        spectrum = [PY, "bench/bench_spectrum.py", "--device", dev, "--cases", "resnet18",
                    "--resnet-batch", "1024", "--repeats", "2", "--results-dir", results_dir,
                    "--max-k-models", "100"]
        return [
            dict(name="krylov", budget=45, cmd=[PY, "bench/bench_krylov.py", "--device", dev,
                                                 "--quick", "--repeats", "5"] + out),
            dict(name="hvp", budget=75, cmd=[PY, "bench/bench_hvp.py", "--device", dev,
                                              "--quick"] + out),
            # ResNet-18 on 1,024 samples: batched products per direction against a gradient,
            # then top-10 and top-100 against the peers (each peer's tolerance ladder cut short:
            # curvlinops' single products cost ~7x ours there, its full ladder does not fit)
            dict(name="spectrum_hvp", budget=60, cmd=spectrum + [
                "--sections", "hvp", "--ks", "10", "--hvp-rounds", "3", "--out",
                "spectrum_gpu_hvp"]),
            dict(name="spectrum_top100", budget=120, cmd=spectrum + [
                "--ks", "100", "--sections", "eig", "--out", "spectrum_gpu_top100",
                "--ladder-max", "1", "--impls", "ours,cupy,curvlinops+scipy"]),
            dict(name="spectrum_top10", budget=90, cmd=spectrum + [
                "--ks", "10", "--sections", "eig", "--out", "spectrum_gpu_top10", "--ladder-max",
                "2", "--impls", "ours,curvlinops+scipy,hessian-eigenthings,cupy"]),
            dict(name="spectrum_compiled", budget=60, cmd=spectrum + [
                "--ks", "10", "--sections", "eig", "--out", "spectrum_gpu_compiled",
                "--ladder-max", "1", "--impls", "ours,curvlinops-compiled"]),
            dict(name="gradients", budget=60, cmd=[PY, "bench/bench_gradients.py", "--device",
                                                   dev, "--quick", "--timeout", "40"] + out),
        ]
    return [
        dict(name="krylov", budget=60, cmd=[PY, "bench/bench_krylov.py", "--quick", "--tiny",
                                            "--repeats", "1"] + out),
        dict(name="hvp", budget=60, cmd=[PY, "bench/bench_hvp.py", "--quick", "--tiny"] + out),
        dict(name="spectrum", budget=90, cmd=[
            PY, "bench/bench_spectrum.py", "--device", "cpu", "--cases", "digits_mlp",
            "--ks", "1", "--sections", "eig", "--impls", "ours", "--repeats", "1",
            "--results-dir", results_dir, "--out", "spectrum_dry"]),
    ]


def run_benchmarks(runner: Runner, cuda: bool) -> Dict[str, Dict]:
    results_dir = os.path.join(runner.out_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    records = {}
    for bench in benchmarks(cuda, results_dir):
        if runner.only_benches and bench["name"] not in runner.only_benches:
            continue
        if runner.remaining() < 15:
            records[bench["name"]] = dict(status="skipped", note="no time left in the budget")
            continue
        before = set(os.listdir(results_dir))
        rc, out, seconds = runner.run(f"bench {bench['name']}", bench["cmd"], bench["budget"],
                                      {"OMP_NUM_THREADS": "1"} if not cuda else None)
        record = step_record(rc, out, seconds)
        new = sorted(set(os.listdir(results_dir)) - before)
        record["results"] = {}
        for name in new:
            with open(os.path.join(results_dir, name)) as f:
                record["results"][name] = json.load(f)
        records[bench["name"]] = record
    return records


# ---- the record and the table ------------------------------------------------------------------

def bench_summary(records: Dict[str, Dict]) -> List[str]:
    lines = []
    for name, rec in records.items():
        figures = []
        for payload in rec.get("results", {}).values():
            for row in (payload.get("rows") or payload.get("svd") or [])[:60]:
                figures.append(row)
        lines.append(f"  bench {name:<16} {rec['status']:<8} {rec.get('seconds', 0):6.1f} s, "
                     f"{len(figures)} rows")
    return lines


def summary_table(record: Dict) -> str:
    steps = record["steps"]
    tests = record.get("tests", {})
    san = record.get("sanitizer", {})
    build = record.get("build", {})
    lines = ["", "== gpu_check summary " + ("(dry run, CPU)" if record["dry_run"] else "(CUDA)"),
             f"  machine   {record['machine'].get('device_name')}  torch "
             f"{record['machine'].get('torch')}  CUDA {record['machine'].get('torch_cuda')}",
             f"  build     {build.get('status')} in {build.get('seconds', 0):.0f} s; slowest "
             "sources: " + ", ".join(f"{k} {v:.0f}s" for k, v in sorted(
                 build.get("compile_seconds", {}).items(), key=lambda kv: -kv[1])[:3]),
             f"  tests     {tests.get('status')}: {tests.get('passed', 0)} passed, "
             f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, "
             f"{tests.get('skipped', 0)} skipped",
             f"  sanitizer {san.get('status')}: {san.get('errors', 'n/a')} errors " + " ".join(
                 f"[{tool}: {max(t['errors'], t['summary_count'])}]"
                 for tool, t in san.get("tools", {}).items())]
    lines += bench_summary(record.get("bench", {}))
    lines.append("  steps     " + ", ".join(f"{s}={v}" for s, v in steps.items()))
    lines.append(f"  total     {record['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="every step on the CPU with tiny sizes; CUDA steps are reported skipped")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_check"),
                   help="folder for the record and the log (default $OUT, else out/gpu_check)")
    p.add_argument("--benches", default="",
                   help="comma list: run only these benchmarks (names in the summary table)")
    p.add_argument("--skip", default="", help="comma list of steps to skip: build, tests, "
                   "sanitizer, bench")
    p.add_argument("--wheel", default=None,
                   help="test this landscape-ext wheel (built on another machine) instead of "
                        "building: installed with --no-deps against this machine's torch; every "
                        "step imports it, not the checkout (PYTHONSAFEPATH)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()
    runner = Runner(args.out, args.budget)
    runner.wheel = None
    if args.wheel:
        site = os.path.join(args.out, "wheel_site")
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                        "--target", site, args.wheel], check=True)
        runner.wheel = os.path.basename(args.wheel)
        runner.env["PYTHONPATH"] = os.pathsep.join([site, runner.env["PYTHONPATH"]])
        runner.env["PYTHONSAFEPATH"] = "1"  # no cwd (the checkout) ahead of the wheel
    runner.only_benches = set(filter(None, args.benches.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    machine = probe_machine(runner, cuda=not args.dry_run)
    cuda = bool(machine.get("cuda_available")) and not args.dry_run
    if not args.dry_run and not cuda:
        print("[gpu_check] no usable GPU here: run with --dry-run on a CPU machine", flush=True)
        return 2
    record = {"dry_run": args.dry_run, "machine": machine, "steps": {}}

    def save():
        record["seconds"] = round(time.monotonic() - t0, 1)
        name = "gpu_check_dry.json" if args.dry_run else "gpu_check_cuda.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(record, f, indent=1, default=str)

    record["build"] = build(runner, machine, cuda, 200) if "build" not in skip else \
        {"status": "skipped"}
    record["steps"]["build"] = record["build"]["status"]
    save()
    if record["build"]["status"] in ("failed", "timeout"):
        print(summary_table(record))
        return 1
    for step, fn, budget in (("tests", run_tests, 110), ("sanitizer", sanitize, 110)):
        record[step] = fn(runner, cuda, budget) if step not in skip else {"status": "skipped"}
        record["steps"][step] = record[step]["status"]
        save()
    if "bench" not in skip:
        record["bench"] = run_benchmarks(runner, cuda)
        for name, rec in record["bench"].items():
            record["steps"][f"bench_{name}"] = rec["status"]
    save()
    print(summary_table(record), flush=True)
    bad = [s for s, status in record["steps"].items() if status in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
