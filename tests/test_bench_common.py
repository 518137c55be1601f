"""bench/common.py's interleaved timing: paired_rounds (warm-up, rounds, rotation, seconds) and
ratio_summary (per-round ratios against hand-computed numbers)."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_common():
    # loaded by path under its own name: "common" alone could clash with another module
    spec = importlib.util.spec_from_file_location(
        "bench_common_under_test", os.path.join(HERE, "..", "bench", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load_common()


def _recorder(log, name):
    return lambda: log.append(name)


def test_paired_rounds_warms_each_once_then_rotates_the_order():
    log = []
    fns = {n: _recorder(log, n) for n in ("a", "b", "c")}
    times = common.paired_rounds(fns, rounds=4)
    assert log[:3] == ["a", "b", "c"]  # the warm-up
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert len(log) == 3 + 12
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    # no fn always runs first
    assert {r[0] for r in rounds} == {"a", "b", "c"}


def test_paired_rounds_without_warmup_and_seconds_per_call():
    log = []
    fns = {"fast": _recorder(log, "fast"),
           "slow": lambda: (log.append("slow"), time.sleep(0.02))}
    times = common.paired_rounds(fns, rounds=2, warmup=False)
    assert len(log) == 4
    assert all(t >= 0.02 for t in times["slow"])
    assert all(t < 0.02 for t in times["fast"])


def test_paired_rounds_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        common.paired_rounds({"a": lambda: None}, rounds=0)


def test_ratio_summary_is_per_round_not_ratio_of_medians():
    # per-round ratios 2, 3, 1.5 -> median 2, range 1.5-3; the ratio of the medians would be
    # 4 / 2 = 2 here too, so a second case separates them
    s = common.ratio_summary([4.0, 6.0, 3.0], [2.0, 2.0, 2.0])
    assert s == {"median": 2.0, "min": 1.5, "max": 3.0, "n": 3}
    # slow spell hits both in round 1: ratios 2, 2, 2 (ratio of medians: 10 / 2 = 5)
    s = common.ratio_summary([2.0, 20.0, 10.0], [1.0, 10.0, 5.0])
    assert s["median"] == pytest.approx(2.0) and s["min"] == pytest.approx(2.0)
    assert s["max"] == pytest.approx(2.0)
    s = common.ratio_summary([1.0, 3.0], [2.0, 2.0])  # even n: mean of the middle two
    assert s["median"] == pytest.approx(1.0) and s["n"] == 2
    assert common.fmt_range({"median": 2.314, "min": 2.2, "max": 2.52}) == "2.31 (2.2-2.52)"


def test_ratio_summary_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="got 2 and 3"):
        common.ratio_summary([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="got 0 and 0"):
        common.ratio_summary([], [])
