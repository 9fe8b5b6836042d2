"""The one report writer: JSON records, markdown, a self-contained HTML page and PNG plots in a report
directory, for `eval`, `overlap`, `synth compare` and `synth sft-eval`.

Every file is written to a temporary name beside it and renamed, so a crash or a full disk never leaves a
half-written results.json next to a finished plot; numbers are formatted one way in markdown and HTML.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np

from .streaming import fsync_write


def _atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    fsync_write(path, lambda tmp: tmp.write_bytes(data))  # the one temp + fsync + rename of the project
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, doc, **dumps_kwargs) -> Path:
    """``doc`` as indented JSON (non-ASCII kept readable) with a final newline."""
    return write_text(path, json.dumps(doc, indent=2, ensure_ascii=False, **dumps_kwargs) + "\n")


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG and close it (figures left open pile up in long runs)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # a legend beside the axes stays in the image
    plt.close(fig)
    return _atomic(path, buf.getvalue())


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(c) -> str:
    """A table cell: floats to 3 decimals, NaN and None empty."""
    if isinstance(c, float):
        return "" if np.isnan(c) else f"{c:.3f}"
    return "" if c is None else str(c)


def markdown_grid(header, body) -> str:
    """A markdown table of ``body`` rows under ``header``."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def inline_markdown(text: str) -> str:
    """A line of this project's markdown (`code`, **bold**, *emphasis*) as HTML, everything else escaped."""
    import re

    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", out)


def html_list(items: list[str]) -> str:
    """A bulleted list of markdown lines (``inline_markdown``), boxed: what a report says first."""
    return "<ul class='lead'>" + "".join(f"<li>{inline_markdown(s)}</li>" for s in items) + "</ul>"


def write_html(path, title: str, sections: list[tuple[str, str]], images: list[Path]) -> Path:
    """sections: (heading, html body); images are embedded inline so the file stands alone."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             "ul.lead{background:#f5f8ff;border-left:4px solid #3b6fd8;padding:.8em 1em .8em 2em;line-height:1.5}"
             "td:first-child,th:first-child{text-align:left}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for img in images:
        b64 = base64.b64encode(Path(img).read_bytes()).decode()
        parts.append(f"<h3>{html.escape(Path(img).stem)}</h3><img alt='{html.escape(Path(img).stem)}' "
                     f"src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return write_text(path, "".join(parts))
