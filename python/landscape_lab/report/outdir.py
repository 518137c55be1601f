"""The output folder of a report: never mixed with another report's files.

A report writes a fixed set of files into its folder (the Markdown and HTML documents, the
results JSON, the figures, and for the built-in examples the training log and checkpoints).
Writing a new report over an old one would leave the old one's extra files (a barrier figure, its
checkpoints) beside the new ones, which then read as belonging to it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Union

#: What a report writes into its folder (files and folders).
REPORT_ARTIFACTS = ("report.md", "report.html", "results.json", "figures", "checkpoints",
                    "train_log.jsonl")
#: The files that mark a folder as holding a report (a training run's folder, with its own
#: train_log.jsonl and checkpoint, does not).
REPORT_MARKERS = ("report.md", "report.html")


def report_artifacts(out: Union[str, Path]) -> List[Path]:
    """The files of a report already in ``out``: none unless it holds a report document."""
    out = Path(out)
    if not any((out / name).exists() for name in REPORT_MARKERS):
        return []
    return [out / name for name in REPORT_ARTIFACTS if (out / name).exists()]


def prepare_report_dir(out: Union[str, Path], overwrite: bool, owner: str) -> Path:
    """Create ``out``; if it already holds a report, refuse (``SystemExit`` naming the files and
    ``--overwrite``) unless ``overwrite``, in which case that report's files are removed first.
    Files a report does not write are left alone."""
    out = Path(out)
    found = report_artifacts(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise SystemExit(f"{owner}: --out {out} already holds a report ({names}); pass "
                         f"--overwrite to replace it (its files are removed first) or choose "
                         f"another --out")
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
