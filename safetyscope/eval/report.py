"""The evaluation's plots (PNG), from result dicts; tables, HTML and file writing are in `safetyscope.reports`."""

from __future__ import annotations

import numpy as np

from ..reports import pyplot, save_figure


def plot_heatmap(matrix, row_labels, col_labels, title, path, *, fmt="{:.2f}", cmap="viridis", xlabel="", ylabel=""):
    m = np.asarray(matrix, dtype=float)
    fig, ax = pyplot().subplots(figsize=(1.0 + 0.55 * len(col_labels), 1.0 + 0.5 * len(row_labels)))
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
    save_figure(fig, path)


def plot_efficiency(eff: dict, path):
    fr = np.array(eff["fractions"]) * 100
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
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
    save_figure(fig, path)


def plot_method_bars(rows: list[dict], methods: list[str], path, metric: str = "f1"):
    langs = sorted({r["lang"] for r in rows})
    look = {(r["lang"], r["method"]): r.get(metric, np.nan) for r in rows}
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    # at most 20 inches wide: 14 languages x 8 methods stays legible in the HTML page and on GitHub
    fig, ax = pyplot().subplots(figsize=(min(20, max(7, 0.9 * len(langs) * max(1, len(methods)) * 0.35 + 2)), 5))
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
    save_figure(fig, path)

