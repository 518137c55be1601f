"""The model operators' modes (issue 18): auto's choice by measurement (deterministic given its
timings, recorded, respected when forced, identical across ranks), every mode against a dense
float64 Hessian / GGN, and the compiled forward-over-reverse product against the eager one."""
from __future__ import annotations

import datetime
import logging
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import landscape_ext as le
from landscape_ext import GGNOperator, HessianOperator
from landscape_ext.operators import modes

from conftest import dense_ggn, make_problem

pytestmark = pytest.mark.usefixtures("single_thread")

FOR, DB, LOOP = modes.FORWARD_OVER_REVERSE, modes.DOUBLE_BACKWARD, modes.DOUBLE_BACKWARD_LOOP


class ScriptedTimer:
    """An injected timer: runs each piece, reports the scripted seconds, counts its calls."""

    def __init__(self, seconds):
        # a value may be a list: the seconds of successive calls of that piece
        self.seconds, self.calls = dict(seconds), []

    def __call__(self, what, fn):
        self.calls.append(what)
        t = self.seconds[what]
        return fn(), (t.pop(0) if isinstance(t, list) else t)


def _directions(d, k, seed=1):
    return torch.randn(d, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_bucket_of():
    assert [modes.bucket_of(k) for k in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        modes.bucket_of(0)


# (graph, loop per direction, batched on k - 1, forward-over-reverse), expected winner, k = 4
CASES = [
    # cached graph: loop 4 x 0.1 = 0.4 beats batched (2 directions) 0.5 * 4/2 and
    # forward-over-reverse 2.0
    (dict(cache=True, graph=1.0, loop=0.1, batched=0.5, fwd=2.0), LOOP,
     {FOR: 2.0, DB: 1.0, LOOP: 0.4}),
    # the graph rebuilt per product counts: forward-over-reverse wins
    (dict(cache=False, graph=1.0, loop=0.1, batched=0.5, fwd=1.2), FOR,
     {FOR: 1.2, DB: 2.0, LOOP: 1.4}),
    (dict(cache=True, graph=1.0, loop=0.3, batched=0.3, fwd=2.0), DB,
     {FOR: 2.0, DB: 0.6, LOOP: 1.2}),
    # ties go to the order of AUTOGRAD_MODES
    (dict(cache=True, graph=0.0, loop=0.25, batched=0.5, fwd=1.0), FOR,
     {FOR: 1.0, DB: 1.0, LOOP: 1.0}),
]


@pytest.mark.parametrize("case,winner,expected", CASES)
def test_choice_is_deterministic_given_timings(exact_hessian, case, winner, expected):
    model, loss, data = make_problem("cnn")
    H = exact_hessian("cnn")
    V = _directions(H.shape[0], 4)
    for _ in range(2):  # a second operator with the same timings makes the same choice
        op = HessianOperator(model, loss, data, cache_graph=case["cache"])
        timer = ScriptedTimer({"graph": case["graph"], LOOP: case["loop"], DB: case["batched"],
                               FOR: case["fwd"]})
        op.mode_chooser.timer = timer
        out = op @ V  # the probe's own product is returned
        torch.testing.assert_close(out, H @ V, rtol=1e-10, atol=1e-12)
        assert op.mode_choices == {4: winner} and op.mode_used == winner
        assert set(op.mode_timings) == {4}
        for mode, seconds in expected.items():
            assert op.mode_timings[4][mode] == pytest.approx(seconds, rel=1e-12)
        assert sorted(timer.calls) == sorted(["graph", LOOP, LOOP, DB, FOR])
        # later products of the bucket (k = 3, 4) run the choice without measuring again
        out = op @ V[:, :3]
        torch.testing.assert_close(out, H @ V[:, :3], rtol=1e-10, atol=1e-12)
        assert op.mode_used == winner and len(timer.calls) == 5


@pytest.mark.parametrize("margin,winner", [(modes.PRIOR_MARGIN, FOR), (0.0, DB)])
def test_near_tie_keeps_the_prior_rule(margin, winner):
    # k = 4 on a cached graph: the prior rule runs forward-over-reverse. Batched double backward
    # is estimated 0.2 * 4/2 = 0.4 s against 0.41 s: 2.5% faster, inside the 5% margin, so the
    # prior mode stays; with no margin the measured minimum wins.
    model, loss, data = make_problem("cnn")
    op = HessianOperator(model, loss, data)
    op.mode_chooser = modes.ModeChooser(ScriptedTimer({"graph": 1.0, LOOP: 0.2, DB: 0.2,
                                                       FOR: 0.41}), prior_margin=margin)
    op @ _directions(op.d, 4)
    assert op.mode_choices == {4: winner}
    # outside the margin the measurement wins whatever the margin
    chooser = modes.ModeChooser(prior_margin=margin)
    assert chooser.decide(8, {FOR: 1.0, DB: 0.5, LOOP: 0.9}, prior=FOR) == DB
    with pytest.raises(ValueError, match="prior_margin must be >= 0, got -0.1"):
        modes.ModeChooser(prior_margin=-0.1)


def test_loop_estimate_uses_the_warm_call_and_k2_has_no_batched_candidate(exact_hessian):
    # the first looped direction runs through a fresh graph (cold, 1.0 s), the second warm
    # (0.1 s): the loop's estimate is 2 x 0.1, so it beats forward-over-reverse's 0.5; at
    # k = 2 no direction is left for the batched call, which is not a candidate
    model, loss, data = make_problem("cnn")
    H = exact_hessian("cnn")
    op = HessianOperator(model, loss, data)
    timer = ScriptedTimer({"graph": 0.3, LOOP: [1.0, 0.1], FOR: 0.5})
    op.mode_chooser.timer = timer
    V = _directions(op.d, 2)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert timer.calls == ["graph", LOOP, LOOP, FOR]
    assert op.mode_timings == {2: {FOR: 0.5, LOOP: pytest.approx(0.2)}}
    assert op.mode_choices == {2: LOOP}
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)  # the loop, unprobed
    assert op.mode_used == LOOP and len(timer.calls) == 4


def test_single_products_are_not_probed(exact_hessian):
    model, loss, data = make_problem("cnn")
    H = exact_hessian("cnn")
    op = HessianOperator(model, loss, data)
    timer = ScriptedTimer({"graph": 0.0, DB: 1.0, FOR: 0.5})
    op.mode_chooser.timer = timer
    v = _directions(op.d, 1)[:, 0]
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert timer.calls == [] and op.mode_used == DB and op.mode_choices == {}
    # the second one-direction product measures bucket 1: two candidates (loop == batched)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert op.mode_timings == {1: {FOR: 0.5, DB: 1.0}} and op.mode_choices == {1: FOR}
    assert op.mode_used == FOR


def test_probe_costs_one_extra_product():
    model, loss, data = make_problem("cnn")
    op = HessianOperator(model, loss, data)
    rows = {"double": 0, "forward": 0}
    double_rows, forward_rows = op._double_backward_rows, op._apply_rows_forward_over_reverse

    def count_double(state, X, *a, **kw):
        rows["double"] += X.shape[0]
        return double_rows(state, X, *a, **kw)

    def count_forward(X, *a, **kw):
        rows["forward"] += X.shape[0]
        return forward_rows(X, *a, **kw)

    op._double_backward_rows, op._apply_rows_forward_over_reverse = count_double, count_forward
    op @ _directions(op.d, 5)
    assert rows == {"double": 5, "forward": 5}  # two products of 5 directions: one returned
    op @ _directions(op.d, 5)
    assert sum(rows.values()) == 15  # no second probe


@pytest.mark.parametrize("mode", [FOR, DB, LOOP])
def test_forced_mode_is_respected(mode):
    model, loss, data = make_problem("cnn")
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, loss, data, mode=mode)
        op.mode_chooser.timer = ScriptedTimer({})  # raises KeyError if anything is timed
        for k in (1, 1, 3, 8):
            op @ _directions(op.d, k)
            assert op.mode_used == mode
        assert op.mode_timings == {} and op.mode_choices == {}


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("mode", [FOR, DB, LOOP, "auto"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_every_mode_matches_the_dense_hessian_and_ggn(exact_hessian, name, mode, chunk_size):
    model, loss, data = make_problem(name)
    H, G = exact_hessian(name), dense_ggn(model, loss, data)
    V = _directions(H.shape[0], 5)
    for cls, M in ((HessianOperator, H), (GGNOperator, G)):
        op = cls(model, loss, data, mode=mode, chunk_size=chunk_size)
        torch.testing.assert_close(op @ V, M @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op @ V[:, 0], M @ V[:, 0], rtol=1e-10, atol=1e-12)
        if mode != "auto":
            assert op.mode_used == mode
        elif name == "cnn":  # measured: the probe's product above was checked
            assert op.mode_choices[8] in modes.AUTOGRAD_MODES


def test_loop_mode_on_several_batches(exact_hessian):
    model, loss, (X, y) = make_problem("cnn")
    H = exact_hessian("cnn")
    batches = [(X[:10], y[:10]), (X[10:], y[10:])]
    V = _directions(H.shape[0], 3)
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, loss, batches, mode=LOOP)
        out = op @ V
        if cls is HessianOperator:
            torch.testing.assert_close(out, H @ V, rtol=1e-10, atol=1e-12)
        else:
            ref = GGNOperator(model, loss, batches, mode=FOR) @ V
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ---- data parallel: every rank takes rank 0's choice ------------------------------------------

def _rank_worker(rank: int, world: int, tmp: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model, loss, (X, y) = make_problem("cnn")
        shard = (X[:12], y[:12]) if rank == 0 else (X[12:], y[12:])
        op = HessianOperator(model, loss, shard, process_group=dist.group.WORLD)
        # each rank measures differently: rank 0 finds the loop fastest, rank 1 the forward mode
        fast = {0: LOOP, 1: FOR}[rank]
        seconds = {"graph": 0.0, LOOP: 1.0, DB: 1.0, FOR: 10.0}
        seconds[fast] = 0.01
        op.mode_chooser.timer = ScriptedTimer(seconds)
        V = _directions(op.d, 4)
        first = op @ V
        own = dict(op.mode_timings[4])
        second = op @ V
        torch.save({"first": first, "second": second, "choices": dict(op.mode_choices),
                    "used": op.mode_used, "own": own}, Path(tmp) / f"result{rank}.pt")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        (Path(tmp) / f"error{rank}.txt").write_text(f"{exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ranks_take_rank0s_choice(tmp_path, exact_hessian):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    errors = [(tmp_path / f"error{r}.txt") for r in range(2)]
    assert not any(e.exists() for e in errors), [e.read_text() for e in errors if e.exists()]
    res = [torch.load(tmp_path / f"result{r}.pt") for r in range(2)]
    H = exact_hessian("cnn")
    V = _directions(H.shape[0], 4)
    assert res[0]["own"][LOOP] < res[0]["own"][FOR] and res[1]["own"][FOR] < res[1]["own"][LOOP]
    for r in res:
        assert r["choices"] == {4: LOOP} and r["used"] == LOOP
        torch.testing.assert_close(r["first"], H @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["second"], H @ V, rtol=1e-10, atol=1e-12)


# ---- compiled products ------------------------------------------------------------------------

def test_compile_argument_is_checked():
    model, loss, data = make_problem("mlp")
    with pytest.raises(ValueError, match="compile must be True, False or 'auto', got 'yes'"):
        HessianOperator(model, loss, data, compile="yes")
    assert HessianOperator(model, loss, data).compile is False  # auto on the CPU: off


def test_compiled_products_agree_with_eager():
    """Inductor's kernels against eager ones in float32: equal to the dtype's rounding."""
    model, loss, data = make_problem("cnn", dtype=torch.float32)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2,
                    generator=torch.Generator().manual_seed(3))
    eps = torch.finfo(torch.float32).eps
    for cls in (HessianOperator, GGNOperator):
        eager = cls(model, loss, data, mode=FOR) @ V
        op = cls(model, loss, data, mode=FOR, compile=True)
        out = op @ V
        assert op.compile_error is None
        err = float((out - eager).norm() / eager.norm())
        assert err < 50 * eps, f"{cls.__name__}: compiled vs eager relative error {err:.2e}"


def test_compiled_pieces_do_not_recompile(monkeypatch):
    """Each power of two of directions compiles once (dynamo with an eager backend that counts
    the graphs); k = 3 runs as 2 + 1, k = 4 as 4, repeated calls compile nothing."""
    graphs = []
    real_compile = torch.compile

    def counting(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting,
                                                                         dynamic=False))
    model, loss, data = make_problem("mlp")
    op = HessianOperator(model, loss, data, mode=FOR, compile=True)
    ref = HessianOperator(model, loss, data, mode=FOR)
    assert op._row_pieces(7) == [(0, 4), (4, 6), (6, 7)]
    for k in (3, 3, 4, 3, 4, 1):
        V = _directions(op.d, k)
        torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12)
    assert op.compile_error is None
    n = len(graphs)
    assert 1 <= n <= 3 * 3  # pieces of 2, 1, 4 directions (dynamo may split a graph)
    op @ _directions(op.d, 3)
    op @ _directions(op.d, 4)
    assert len(graphs) == n


@pytest.mark.parametrize("where", ["compile", "call"])
def test_compile_failure_falls_back_to_eager(monkeypatch, caplog, where):
    def broken_compile(fn, **kw):
        if where == "compile":
            raise RuntimeError("no compiler on this machine")

        def call(*args):
            raise RuntimeError("inductor: no compiler on this machine")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, loss, data = make_problem("cnn")
    V = _directions(sum(p.numel() for p in model.parameters()), 3)
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, loss, data, mode=FOR, compile=True)
        with caplog.at_level(logging.WARNING, logger="landscape_ext.operators.model"):
            out = op @ V
        ref = cls(model, loss, data, mode=FOR) @ V
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
        assert "no compiler on this machine" in op.compile_error
        assert op.compile_error.startswith("RuntimeError")
        assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
        # later products run eagerly without trying again
        torch.testing.assert_close(op @ V, ref, rtol=1e-12, atol=1e-14)
        assert op._row_pieces(3) == [(0, 3)]
