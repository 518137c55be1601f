"""bench_hvp.py's models section (bench/bench_models.py) and its new flags, on the tiny sizes:
the JSON holds a row per (k, mode), auto's choice and probe timings, the ``previous auto`` row
pointing at the forced mode of the old rule, and interleaved MLP rows with ranges."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
AUTOGRAD_MODES = {"forward-over-reverse", "double-backward", "double-backward-loop"}
PRIOR_MARGIN = 0.05  # landscape_ext.operators.modes.PRIOR_MARGIN


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_hvp.py"), *args,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_models")
    proc = _run(["--tiny", "--sections", "mlp,models", "--mlp-cases", "16x2x2", "--models",
                 "tiny_lm", "--model-ks", "1,2", "--rounds", "1", "--no-memory"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "hvp_cpu_tiny.json") as f:
        return json.load(f)


def test_models_rows_per_k_and_mode(tiny_run):
    rows = tiny_run["model_rows"]
    modes = ["auto", "forward-over-reverse", "double-backward", "double-backward-loop"]
    for k in (1, 2):
        got = [r["mode"] for r in rows if r["k"] == k]
        assert got == ["gradient (unit)"] + modes + ["previous auto (= double-backward)"]
        for r in rows:
            if r["k"] == k and r["mode"] in modes:
                assert r["grad/dir"] > 0 and r["grad/dir min"] <= r["grad/dir"] <= \
                    r["grad/dir max"]
                assert r["rel err"] < 1e-4 and r["rounds"] == 1
                assert r["peak MB"] is None   # --no-memory
    assert {r["model"] for r in rows} == {"tiny_lm"} and rows[0]["d"] == 135168


def test_previous_auto_points_at_the_forced_mode(tiny_run):
    rows = tiny_run["model_rows"]
    for k in (1, 2):
        prev = next(r for r in rows if r["k"] == k and r["mode"].startswith("previous auto"))
        forced = next(r for r in rows if r["k"] == k and r["mode"] == "double-backward")
        assert prev["grad/dir"] == forced["grad/dir"] and prev["ms"] == forced["ms"]


def test_auto_choice_and_probe_timings_recorded(tiny_run):
    ks = tiny_run["models"]["tiny_lm"]["ks"]
    rows = tiny_run["model_rows"]
    for k, bucket in (("1", "1"), ("2", "2")):
        detail = ks[k]
        picked = detail["auto_picked"]
        assert picked in AUTOGRAD_MODES
        assert detail["auto_mode_choices"][bucket] == picked
        # the probe's estimates: bucket 1 compares forward-over-reverse with double backward,
        # bucket 2 with the loop (no direction is left for a batched call)
        timings = detail["auto_mode_timings"][bucket]
        assert set(timings) == {"forward-over-reverse",
                                "double-backward" if k == "1" else "double-backward-loop"}
        # the fastest, or the prior rule's mode within the margin
        assert timings[picked] <= (1 + PRIOR_MARGIN) * min(timings.values())
        auto = next(r for r in rows if r["k"] == int(k) and r["mode"] == "auto")
        assert auto["auto picked"] == picked and auto["vs previous median"] > 0
        assert set(detail["times_s"]) == {"gradient", "auto", "forward-over-reverse",
                                          "double-backward", "double-backward-loop"}


def test_mlp_rows_are_interleaved_ratios(tiny_run):
    rows = [r for r in tiny_run["rows"] if r["case"].startswith("mlp")]
    assert rows[0]["impl"] == "gradient (unit)" and len(rows) == 9
    assert all(r["case"] == "mlp gelu w=16 L=2 k=2" for r in rows)
    for r in rows[1:]:
        lo, hi = (float(v) for v in r["range"].split("-"))
        assert lo == hi == pytest.approx(r["x grad/dir"], rel=1e-2)   # one round
        assert r["ms/dir"] == pytest.approx(r["ms"] / 2)
    assert tiny_run["machine"]["sections"] == ["mlp", "models"]
    assert not [r for r in tiny_run["rows"] if r["case"].startswith(("xent", "act"))]


def test_bad_flags_name_the_flag_and_value(tmp_path):
    proc = _run(["--tiny", "--sections", "mlp", "--mlp-cases", "16x2"], tmp_path)
    assert proc.returncode != 0 and "--mlp-cases: '16x2' is not WIDTHxDEPTHxK" in proc.stderr
    proc = _run(["--tiny", "--sections", "models", "--models", "resnet50"], tmp_path)
    assert proc.returncode != 0 and "--models: ['resnet50'] not in" in proc.stderr


def test_spectrum_hvp_section_interleaves_modes_with_the_gradient():
    import argparse

    import torch
    from torch import nn

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_spectrum

    torch.manual_seed(0)
    # a conv net (not a plain MLP: auto measures the autograd modes)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    args = argparse.Namespace(hvp_ks=[1, 2], hvp_rounds=2, checkpoint=lambda: None)
    rows, detail = [], {}
    bench_spectrum.hvp_section("conv", model, nn.CrossEntropyLoss(), data, "cpu", args, rows,
                               detail)
    out = detail["hvp"]
    names = set(bench_spectrum.HVP_SECTION_MODES)
    # the keys of before (gradient_s, modes: seconds per direction, mode_used, the loop) kept
    assert out["gradient_s"] > 0 and out["single_retained_graph_s"] > 0
    assert set(out["modes"]) == names and all(set(v) == {1, 2} for v in out["modes"].values())
    assert out["mode_used"]["double-backward-loop (retained graph, one call per direction)"] \
        == "double-backward-loop"
    assert set(out["mode_choices"]["auto (fused-mlp for MLPs)"]) == {1, 2}
    s = out["gradients_per_direction"]["forward-over-reverse"][2]
    assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"]
    assert [r["task"] for r in rows[:2]] == ["gradient", "gradient"]
    hvp_rows = [r for r in rows if r["task"].startswith("HVP")]
    assert len(hvp_rows) == 2 * len(names) + 1   # + the retained-graph loop at k = 1
    assert all(r["rounds"] == 2 and "gradients/direction" in r["setting"] for r in hvp_rows)
