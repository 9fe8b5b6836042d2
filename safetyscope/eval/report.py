"""Plots (PNG) and a self-contained HTML report that embeds them (base64), from result dicts."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_heatmap(matrix, row_labels, col_labels, title, path, *, fmt="{:.2f}", cmap="viridis", xlabel="", ylabel=""):
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(col_labels), 1.0 + 0.5 * len(row_labels)))
    im = ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(row_labels) * len(col_labels) <= 400:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_efficiency(eff: dict, path):
    fr = np.array(eff["fractions"]) * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for la, v in eff["langs"].items():
        ax.errorbar(fr, v["mean_f1"], yerr=v["std_f1"], marker="o", ms=3, lw=1, capsize=2, label=la)
    if eff["macro"]["mean_f1"]:
        ax.plot(fr, eff["macro"]["mean_f1"], "k--", lw=2.5, label="macro")
    ax.set_xscale("log")
    ax.set_xlabel("% of discovery data used")
    ax.set_ylabel("test F1 (OR-rule)")
    ax.set_title("Data efficiency")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_method_bars(rows: list[dict], methods: list[str], path, metric: str = "f1"):
    langs = sorted({r["lang"] for r in rows})
    look = {(r["lang"], r["method"]): r.get(metric, np.nan) for r in rows}
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    # at most 20 inches wide: 14 languages x 8 methods stays legible in the HTML page and on GitHub
    fig, ax = plt.subplots(figsize=(min(20, max(7, 0.9 * len(langs) * max(1, len(methods)) * 0.35 + 2)), 5))
    x = np.arange(len(langs))
    for i, m in enumerate(methods):
        ax.bar(x + i * width, [look.get((la, m), np.nan) for la in langs], width, label=m)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, langs)
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1)
    ax.set_title("Per language: SAE rules beside baselines (same test split)")
    ax.legend(fontsize=8, ncol=min(len(methods), 8), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html_table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(c) -> str:
    if isinstance(c, float):
        return "" if np.isnan(c) else f"{c:.3f}"
    return "" if c is None else str(c)


def write_html(path, title: str, sections: list[tuple[str, str]], images: list[Path]):
    """sections: (heading, html body); images are embedded inline so the file stands alone."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for img in images:
        b64 = base64.b64encode(Path(img).read_bytes()).decode()
        parts.append(f"<h3>{html.escape(Path(img).stem)}</h3><img alt='{html.escape(Path(img).stem)}' "
                     f"src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    Path(path).write_text("".join(parts))


def markdown_grid(header, body) -> str:
    """A markdown table of ``body`` rows under ``header`` (numbers formatted as in the HTML tables)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in body]
    return "\n".join(lines)
