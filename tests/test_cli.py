"""The landscape-lab command line: every subcommand end to end on tiny settings, --help, the
missing-data error, and python -m landscape_lab."""
import json
import shutil
import subprocess
import sys

import pytest

from landscape_lab.cli import build_parser, main

GAUSS = ["--dataset", "gaussian", "--gaussian-n", "120", "--ambient-dim", "6",
         "--intrinsic-dim", "3", "--n-classes", "3"]
SMALL = ["--samples", "40", "--k", "3", "--trace-matvecs", "6", "--slq-steps", "10",
         "--slq-probes", "2"]


def _json(p):
    return json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


@pytest.mark.parametrize("cmd", ["report", "train", "sweep", "barrier", "spectrum"])
def test_help_explains_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--device", "--seed", "--out", "--quiet"):
        assert opt in text
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 8, (cmd, action.dest)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    outs = []
    for seed in (0, 1):
        out = root / f"train{seed}"
        rc = main(["train", *GAUSS, "--width", "4", "--depth", "1", "--epochs", "1",
                   "--batch-size", "30", "--lr", "0.5", "--curvature-every", "3",
                   "--metrics-every", "2", "--k", "2", "--trace-matvecs", "3", "--grad-k", "3",
                   "--curv-samples", "30", "--seed", str(seed), "--out", str(out), "--quiet"])
        assert rc == 0
        outs.append(out)
    return outs


def test_train_outputs(trained):
    out = trained[0]
    s = _json(out / "summary.json")
    assert s["steps"] == 3 and s["n_params"] == 6 * 4 + 4 + 4 * 3 + 3
    lines = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in lines]
    assert kinds[0] == "config" and "curvature" in kinds and "metrics" in kinds
    assert any("grad_effective_rank" in r for r in lines)
    assert (out / "checkpoint.pt").stat().st_size > 0


def test_report_from_checkpoints(trained, tmp_path, capsys):
    a, b = trained
    out = tmp_path / "rep"
    rc = main(["report", "--checkpoint", str(a / "checkpoint.pt"), "--checkpoint-b",
               str(b / "checkpoint.pt"), "--train-log", str(a / "train_log.jsonl"), *SMALL,
               "--grad-samples", "30", "--barrier-points", "5", "--format", "html",
               "--out", str(out), "--quiet"])
    assert rc == 0
    r = _json(out / "results.json")
    assert {"topk", "trace", "esd", "blocks", "gradients", "training", "barrier"} <= set(r)
    assert r["dataset"] == "gaussian" and r["n_samples"] == 40
    assert (out / "report.html").exists()
    assert len(list((out / "figures").glob("*.png"))) == 6
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "elapsed" in printed


def test_report_builtin_example_tiny(tmp_path, capsys):
    out = tmp_path / "ex"
    rc = main(["report", "--example", "digits-mlp", "--epochs", "1", "--width", "4",
               "--depth", "1", "--curvature-every", "50", *SMALL, "--grad-samples", "32",
               "--barrier-points", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    r = _json(out / "results.json")
    assert r["dataset"] == "digits" and r["n_params"] == 64 * 4 + 4 + 4 * 10 + 10
    assert (out / "report.md").exists() and (out / "train_log.jsonl").exists()
    assert (out / "report.html").exists()  # written by default, as the README says
    assert (out / "checkpoints" / "model_b.pt").exists()
    assert "report:" in capsys.readouterr().out


def test_spectrum_and_barrier(trained, tmp_path):
    a, b = trained
    out = tmp_path / "spec"
    assert main(["spectrum", "--checkpoint", str(a / "checkpoint.pt"), "--operator", "ggn",
                 *SMALL, "--out", str(out), "--quiet"]) == 0
    r = _json(out / "results.json")
    assert r["operator"] == "ggn" and len(r["topk"]["eigenvalues"]) == 3
    assert (out / "spectrum.md").exists() and (out / "figures" / "esd.png").stat().st_size > 0
    out = tmp_path / "bar"
    assert main(["barrier", "--checkpoint-a", str(a / "checkpoint.pt"), "--checkpoint-b",
                 str(b / "checkpoint.pt"), "--points", "5", "--samples", "50", "--out",
                 str(out), "--quiet"]) == 0
    r = _json(out / "barrier.json")
    assert len(r["ts"]) == 5 and r["height"] >= 0 and r["dataset"] == "gaussian"
    assert (out / "barrier.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["barrier", "--checkpoint-a", str(a / "checkpoint.pt"), "--out", str(out)])


def test_sweep_resume_and_fit_only(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", "--datasets", "gaussian", "--gaussian-n", "100", "--ambient-dim", "5",
            "--intrinsic-dim", "3", "--n-classes", "3", "--widths", "3,5", "--depths", "1,2",
            "--measure-epochs", "1", "--samples", "30", "--trace-matvecs", "6", "--grad-k", "3",
            "--bootstrap", "50", "--out", str(out), "--quiet"]
    args.append("--no-fit")
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "4 run, 0 already finished" in first
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sum(json.loads(l)["kind"] == "measurement" for l in lines) == 4
    assert main(args) == 0
    assert "0 run, 4 already finished" in capsys.readouterr().out
    assert (out / "results.jsonl").read_text().splitlines()[:len(lines)] == lines
    assert sum(json.loads(l)["kind"] == "measurement"
               for l in (out / "results.jsonl").read_text().splitlines()) == 4
    assert main(["sweep", "--fit-only", "--bootstrap", "50", "--out", str(out), "--quiet"]) == 0
    assert "alpha" in capsys.readouterr().out
    assert _json(out / "scaling_fit.json")["fits"]["mlp|gaussian|sgd"]["n_points"] == 4
    assert (out / "sweep_report.md").exists()


def test_missing_data_files_give_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    rc = main(["train", "--dataset", "cifar10", "--data-dir", str(empty), "--out",
               str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data_batch_1" in err and str(empty) in err and "never downloads" in err
    rc = main(["train", "--dataset", "wikitext2", "--model", "lm", "--data-dir", str(empty),
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "wiki.train.tokens" in err and str(empty) in err


def test_python_dash_m_and_console_script(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["landscape_lab", "--help"])
    with pytest.raises(SystemExit) as ei:
        runpy.run_module("landscape_lab", run_name="__main__")   # python -m landscape_lab
    assert ei.value.code == 0 and "sweep" in capsys.readouterr().out
    exe = shutil.which("landscape-lab")
    if exe is None:
        pytest.skip("console script landscape-lab not installed (pip install -e .)")
    r = subprocess.run([exe, "spectrum", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "--operator" in r.stdout


def test_train_on_cifar_and_wikitext_files(tmp_path):
    from test_data import _write_cifar10, _write_wiki

    _write_cifar10(tmp_path / "cifar-10-batches-py", n_per=4)
    out = tmp_path / "c"
    assert main(["train", "--model", "resnet", "--dataset", "cifar10", "--data-dir",
                 str(tmp_path), "--width", "2", "--depth", "1", "--epochs", "1",
                 "--batch-size", "10", "--curvature-every", "0", "--out", str(out),
                 "--quiet"]) == 0
    s = _json(out / "summary.json")
    assert s["dataset"] == "cifar10" and s["steps"] == 2
    _write_wiki(tmp_path / "wt")
    out = tmp_path / "w"
    assert main(["train", "--model", "lm", "--dataset", "wikitext2", "--data-dir",
                 str(tmp_path / "wt"), "--seq-len", "4", "--width", "8", "--depth", "1",
                 "--epochs", "1", "--batch-size", "2", "--optimizer", "adam",
                 "--curvature-every", "2", "--k", "1", "--curv-samples", "4", "--out", str(out),
                 "--quiet"]) == 0
    lines = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "curvature" and r["lambda_max"] is not None for r in lines)


def test_report_transformer_examples(tmp_path, capsys):
    from test_data import _write_cifar10

    out = tmp_path / "lm"
    assert main(["report", "--example", "tiny-lm", "--quick", "--k", "2", "--sections",
                 "topk,blocks,barrier", "--no-barrier", "--out", str(out), "--quiet"]) == 0
    r = _json(out / "results.json")
    # --k given: replaces the example's size; the rest are the quick example's sizes
    assert len(r["topk"]["eigenvalues"]) == 2 and r["config"]["n_samples"] == 8
    assert r["dataset"] == "markov-text" and "barrier" not in r
    assert (out / "figures" / "blocks.png").exists()
    assert list(r["blocks"]["lambda_max"]) == ["embeddings", "attention", "mlp", "norms", "head"]
    _write_cifar10(tmp_path / "cifar-10-batches-py", n_per=4)
    out = tmp_path / "vit"
    assert main(["report", "--example", "vit", "--quick", "--data-dir", str(tmp_path),
                 "--sections", "topk,blocks", "--out", str(out), "--quiet"]) == 0
    r = _json(out / "results.json")
    assert r["dataset"] == "cifar10" and set(r["blocks"]["sizes"]) >= {"embeddings", "head"}
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["report", "--example", "tiny-lm", "--quick", "--data-dir", str(empty),
               "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "wiki.train.tokens" in err and str(empty) in err
    with pytest.raises(SystemExit, match="--quick"):
        main(["report", "--checkpoint", str(tmp_path / "c.pt"), "--quick", "--out",
              str(tmp_path / "x")])


def test_report_refuses_a_folder_holding_another_report(tmp_path):
    # issue 26 (report item 5): a second report over the first mixed the two reports' files
    from landscape_lab.report.outdir import prepare_report_dir

    out = tmp_path / "rep"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "barrier.png").write_bytes(b"old")
    (out / "report.md").write_text("old report")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(SystemExit, match=r"landscape-lab report: --out .*rep already holds a "
                                         r"report \(report\.md, figures\); pass --overwrite"):
        main(["report", "--example", "digits-mlp", "--quick", "--out", str(out), "--quiet"])
    assert (out / "report.md").read_text() == "old report"  # refused before anything ran
    prepare_report_dir(out, overwrite=True, owner="test")
    assert not (out / "report.md").exists() and not (out / "figures").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"  # not a report's file
    prepare_report_dir(tmp_path / "new" / "deep", overwrite=False, owner="test")  # created
    assert (tmp_path / "new" / "deep").is_dir()
