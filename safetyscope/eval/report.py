"""The evaluation's report files from its results (``results.json``'s dict): report.md, a self-contained
report.html and PNG plots, led by a summary computed from the results and a glossary of method names. The same
function writes them at the end of `eval` and again from a committed results.json without rerunning any model:

    python -m safetyscope.eval.report reports/gemma3-270m
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

import numpy as np

from ..reports import html_list, html_table, inline_markdown, markdown_grid, pyplot, save_figure, write_html, write_text
from . import by_source
from . import controls as ctl
from .per_language import markdown_table
from .summary import glossary, summary

MAIN_METHODS = ["shipped", "or_rule_fpr2", "or_rule", "or_rule_delta", "or_rule_report", "sparse_linear", "sparse_linear_fpr2",
                "logreg_sae", "probe_raw", "majority"]
LEAD_METRICS = ("recall_at_1pct_fpr", "recall_at_5pct_fpr", "fpr", "precision_at_5pct", "precision_at_10pct",
                "average_precision", "roc_auc", "balanced_accuracy", "f1", "precision", "recall")


def write_report(out: Path, results: dict) -> list[Path]:
    """report.md, report.html and the plots of one evaluation in ``out``; returns the plots written."""
    results = json.loads(json.dumps(results))  # as results.json reads back: every key a string
    cfg, rows = results["config"], results["per_language"]
    lang_list = cfg["langs"]
    controls = results.get("random_controls") or {"langs": {}}
    grouped, transfer, eff, sweep = (results.get(k) for k in ("by_group", "transfer", "efficiency", "layer_sweep"))
    k_sweep = sorted({r["method"] for r in rows if r["method"].startswith("or_rule_K=")}, key=lambda m: int(m[10:]))
    title = f"safetyscope evaluation: {cfg['model']}, layer {cfg['layer']}"
    lines, names = summary(results), glossary({r["method"] for r in rows})
    images = [out / "per_language_f1.png"]
    plot_method_bars(rows, MAIN_METHODS, images[0])
    md = [f"# {title}", "",
          f"{cfg['texts']} texts, {len(lang_list)} language(s). Every method is fitted on a language's discovery split "
          "and measured on its test split. OR-rules: `or_rule` (greedy selection of feature + threshold pairs), "
          "`or_rule_delta` (top K by delta, each feature capped at a 2% clean firing rate), `or_rule_report` "
          "(the Qwen-Scope report's rule: top K by delta, threshold 0); K from 1, 2, 5, 10 by mean F1 on 3 hold-outs "
          "of the discovery split. `sparse_linear`: L1 logistic rule over <= 128 SAE features. "
          "Baselines: `logreg_sae` (L1 logistic regression on all SAE features), "
          "`probe_raw` (logistic probe on mean-pooled raw activations), `majority`.", ""]
    sections = [("Summary", html_list(lines)), ("Method names", _glossary_html(names))]
    md += ["## Summary", ""] + [f"- {s}" for s in lines] + ["", "## Method names", "",
                                                            markdown_grid(["method", "what it is"], names), ""]
    md += ["Tables lead with what a user picks a detector by on real traffic, where toxic texts are a few per cent: "
           "`recall_at_1pct_fpr` / `recall_at_5pct_fpr` (best recall of any threshold on the method's score with at most "
           "1 % / 5 % of clean test texts flagged), then at the method's own operating point its clean firing rate `fpr` "
           "and `precision_at_5pct` / `precision_at_10pct` (the precision its test TPR and FPR give at 5 % / 10 % toxic "
           "prevalence: p*TPR / (p*TPR + (1-p)*FPR)). F1 on these balanced splits comes last: flagging everything "
           "already scores 0.667 there. `or_rule_fpr2` is greedy selection at `--criterion recall_at_fpr --target-fpr "
           "0.02` (the `discover` default); `sparse_linear_fpr2` is `sparse_linear` with its threshold at a 2 % clean "
           "firing rate of out-of-fold discovery scores (`discover --kind sparse_linear`'s default).", ""]
    for metric in LEAD_METRICS:
        md += [f"## Per language: {metric}", "", markdown_table(rows, MAIN_METHODS, metric), ""]
    md += ["## OR-rule K sweep (F1)", "", markdown_table(rows, k_sweep, "f1"), ""]
    sections.append(("Per language (recall at 1% clean FPR)",
                     _html_from_rows(rows, MAIN_METHODS, "recall_at_1pct_fpr", lang_list)))
    sections.append(("Per language (precision at 5% prevalence)",
                     _html_from_rows(rows, MAIN_METHODS, "precision_at_5pct", lang_list)))
    sections.append(("Per language (F1)", _html_from_rows(rows, MAIN_METHODS, "f1", lang_list)))
    sections.append(("Per language (ROC-AUC)", _html_from_rows(rows, MAIN_METHODS, "roc_auc", lang_list)))
    sections.append(("OR-rule K sweep (F1)", _html_from_rows(rows, k_sweep, "f1", lang_list)))
    if controls["langs"]:
        md += ctl.markdown(rows, controls)
        sections.append(("Random controls (is the SAE doing the work?)", ctl.html(
            rows, controls, lang_list, lambda r, m, metric, g: _html_from_rows(r, m, metric, g))))
    if grouped:
        md += by_source.markdown(grouped["per_group"], grouped["out_of_group"], grouped["column"])
    if transfer:
        images.append(out / "transfer_f1.png")
        plot_heatmap(transfer["f1"], lang_list, lang_list, "F1: discover on row, test on column", images[-1],
                            xlabel="test language", ylabel="discovery language")
        images.append(out / "transfer_jaccard_top10.png")
        plot_heatmap(transfer["jaccard_top10"], lang_list, lang_list, "Jaccard overlap of top-10 features",
                            images[-1], cmap="magma")
        header = ["discover \\ test"] + lang_list
        body = [[a] + [float(v) for v in r] for a, r in zip(lang_list, transfer["f1"])]
        md += ["## Cross-lingual transfer (F1, discover on row, test on column)", "", markdown_grid(header, body), ""]
        sections.append(("Cross-lingual transfer (F1)", html_table(header, body)))
    if eff:
        images.append(out / "efficiency.png")
        plot_efficiency(eff, images[-1])
        header = ["lang", "K", "full F1"] + [f"{f * 100:g}%" for f in eff["fractions"]] + ["smallest for 99%"]
        body = [[la, v["k"], v["full_f1"], *v["mean_f1"], _pct(v["smallest_fraction_99pct"])]
                for la, v in eff["langs"].items()]
        body.append(["macro", "", eff["macro"]["full_f1"], *eff["macro"]["mean_f1"],
                     _pct(eff["macro"]["smallest_fraction_99pct"])])
        md += ["## Data efficiency (mean test F1 over seeds)", "", markdown_grid(header, body), ""]
        sections.append(("Data efficiency (mean F1 over seeds)", html_table(header, body)))
    if sweep and sweep["f1"]:
        header = ["lang"] + [f"layer {la}: F1 (best delta)" for la in sweep["layers"]] + ["chosen by delta"]
        body = [[g] + [f"{sweep['f1'][g][str(la)]:.3f} ({sweep['best_delta'][g][str(la)]:.3f})" for la in sweep["layers"]]
                + [sweep["chosen"][g]] for g in sweep["f1"]]
        body.append(["macro F1"] + [sweep["macro_f1"][str(la)] for la in sweep["layers"]] + [sweep["macro_f1_chosen"]])
        md += [f"## Layer sweep (OR-rule test F1; best single-feature delta on discovery; main analyses use layer "
               f"{cfg['layer']})", "", markdown_grid(header, body), ""]
        sections.append(("Layer sweep (OR-rule F1, best delta)", html_table(header, body)))
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_html(out / "report.html", title, sections, images)
    return images


def _glossary_html(names: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td><code>{escape(m)}</code></td><td style='text-align:left'>{inline_markdown(t)}</td></tr>"
                   for m, t in names)
    return f"<table><thead><tr><th>method</th><th style='text-align:left'>what it is</th></tr></thead><tbody>{body}</tbody></table>"


def _pct(f):
    return None if f is None else f"{f * 100:g}%"


def _html_from_rows(rows, methods, metric, langs) -> str:
    look = {(r["lang"], r["method"]): r.get(metric) for r in rows}
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    body = [[la] + [look.get((la, m)) for m in present] for la in langs]
    return html_table(["lang"] + present, body)


def colours(n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, else tab20's strong shades first, then its light ones."""
    plt = pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    tab20 = plt.get_cmap("tab20")
    return [tab20(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))][:n] + ["0.3"] * max(0, n - 20)


MARKERS = "osD^vPX<>*"


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
    """One line per language (distinct colour and marker: 14 languages never share a look), the macro dashed."""
    fr = np.array(eff["fractions"]) * 100
    fig, ax = pyplot().subplots(figsize=(8.5, 4.8))
    for i, ((la, v), c) in enumerate(zip(eff["langs"].items(), colours(len(eff["langs"])))):
        ax.errorbar(fr, v["mean_f1"], yerr=v["std_f1"], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.2, capsize=2,
                    color=c, label=la)
    if eff["macro"]["mean_f1"]:
        ax.plot(fr, eff["macro"]["mean_f1"], "k--", lw=2.5, label="macro")
    ax.set_xscale("log")
    ax.set_xlabel("% of discovery data used")
    ax.set_ylabel("test F1 (OR-rule)")
    ax.set_title("Data efficiency")
    ax.legend(fontsize=9, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="language", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_method_bars(rows: list[dict], methods: list[str], path, metric: str = "f1"):
    """Grouped bars per language, one distinct colour per method; the legend beside the plot, one method a line
    (what each name means: the report's glossary)."""
    langs = sorted({r["lang"] for r in rows})
    look = {(r["lang"], r["method"]): r.get(metric, np.nan) for r in rows}
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    fig, ax = pyplot().subplots(figsize=(min(16, max(7, 0.75 * len(langs) + 2)), 5))
    x = np.arange(len(langs))
    for i, (m, c) in enumerate(zip(methods, colours(len(methods)))):
        vals = [look.get((la, m), np.nan) for la in langs]
        ax.bar(x + i * width, [np.nan if v is None else v for v in vals], width, label=m, color=c,
               hatch="//" if m == "majority" else None, edgecolor="white" if m != "majority" else "0.4", linewidth=0.3)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, langs)
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per language: SAE rules beside baselines (test {metric})")
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the report files of report directories from their results.json (no model is run)."""
    dirs = (argv if argv is not None else sys.argv[1:]) or []
    if not dirs:
        print("usage: python -m safetyscope.eval.report REPORT_DIR...", file=sys.stderr)
        return 2
    for d in map(Path, dirs):
        images = write_report(d, json.loads((d / "results.json").read_text()))
        print(f"wrote {d / 'report.md'}, {d / 'report.html'} and {len(images)} plot(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
