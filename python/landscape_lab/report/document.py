"""The report document: headings, paragraphs, tables and figures, rendered to Markdown or HTML.

The report builders add blocks to a :class:`_Doc`; :meth:`_Doc.write` renders them once per
requested format, so the Markdown and the HTML report always say the same thing.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .._results import format_float

FORMATS = ("markdown", "html", "both")


def _fmt(x: Any, digits: int = 4) -> str:
    """A number as report text: ``n/a`` for None, yes/no for booleans, ``digits`` significant
    digits for floats."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return format_float(x, digits)


def _fmt_range(lo: Any, hi: Any, sep: str = ", ") -> str:
    """``lo`` and ``hi`` formatted with :func:`_fmt` and joined by ``sep``."""
    return f"{_fmt(lo)}{sep}{_fmt(hi)}"


def _fmt_ci(ci: Optional[Sequence[float]]) -> str:
    """A confidence interval as ``lo .. hi``, or ``n/a`` when there is none."""
    return _fmt_range(ci[0], ci[1], " .. ") if ci else "n/a"


def check_format(fmt: str) -> None:
    """Raise ValueError unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"report format must be 'markdown', 'html' or 'both', got {fmt!r}")


class _Doc:
    """An ordered list of blocks (``h2``, ``p``, ``table``, ``img``) with a title."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: List[Tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [[_fmt(c) if not isinstance(c, str) else c
                                                        for c in r] for r in rows])))

    def img(self, rel: str, caption: str) -> None:
        self.blocks.append(("img", (rel, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, v in self.blocks:
            if kind == "h2":
                out += [f"## {v}", ""]
            elif kind == "p":
                out += [v, ""]
            elif kind == "table":
                hdr, rows = v
                out.append("| " + " | ".join(hdr) + " |")
                out.append("|" + "|".join("---" for _ in hdr) + "|")
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                        for r in rows]
                out.append("")
            elif kind == "img":
                rel, cap = v
                out += [f"![{cap}]({rel})", "", f"*{cap}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
               f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
               "text-align:right}img{max-width:100%}figcaption{font-style:italic}</style>",
               "</head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, v in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(v)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(v)}</p>")
            elif kind == "table":
                hdr, rows = v
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in hdr) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                rel, cap = v
                out.append(f"<figure><img src='{e(rel)}' alt='{e(cap)}'>"
                           f"<figcaption>{e(cap)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, out_dir: Path, stem: str, fmt: str) -> Path:
        """Write ``stem.md`` and/or ``stem.html`` to ``out_dir``; returns the Markdown file
        when there is one, else the HTML file."""
        check_format(fmt)
        main = None
        if fmt in ("markdown", "both"):
            main = out_dir / f"{stem}.md"
            main.write_text(self.markdown(), encoding="utf-8")
        if fmt in ("html", "both"):
            p = out_dir / f"{stem}.html"
            p.write_text(self.html(), encoding="utf-8")
            main = main or p
        return main
