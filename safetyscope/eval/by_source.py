"""Generalization measured, not assumed (`eval --group-column source`): every method's test results per source
of a language, and leave-one-source-out refits, so a rule that only learnt one source's style shows it.

- ``per_source``: for each (language, method) already scored on the test split, recall and clean FPR per source
  at the method's own operating point; the worst source's recall beside the language's.
- ``out_of_source``: for a language whose discovery rows come from two or more sources, each source in turn is
  left out of the fit; the rule fitted on the rest is scored on that source's test rows, beside the same method
  fitted on every source (recall kept = held-out recall / in-source recall).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .metrics import binary_metrics
from .per_language import methods, split_indices

# the per-source table: the shipped classifier (with -c), the rules `discover` writes and the baselines beside them
PER_SOURCE_METHODS = ("shipped", "or_rule_fpr2", "or_rule", "sparse_linear_fpr2", "logreg_sae", "probe_raw")
# refitted once per left-out source: the rule kinds a user ships, and the raw probe as the baseline beside them
OUT_OF_SOURCE_METHODS = ("or_rule_fpr2", "sparse_linear_fpr2", "probe_raw")


def _rates(y: np.ndarray, pred: np.ndarray) -> dict:
    pred = np.asarray(pred).astype(bool)
    return {"toxic": int(y.sum()), "clean": int((1 - y).sum()),
            "recall": float(pred[y == 1].mean()) if y.any() else None,
            "fpr": float(pred[y == 0].mean()) if (1 - y).any() else None}


def per_source(df: pl.DataFrame, groups: np.ndarray, outputs: dict) -> list[dict]:
    """Rows (lang, method, source, toxic, clean, recall, fpr) from ``outputs`` {(lang, method): (y, pred, score)}
    of the test rows, plus a ``worst`` row per (lang, method): the lowest recall of any source with toxic rows."""
    rows = []
    for (lang, method), (y, pred, _) in outputs.items():
        _, t_idx = split_indices(df, lang)
        g = groups[t_idx]
        recalls = []
        for source in sorted(set(g.tolist())):
            m = g == source
            r = {"lang": lang, "method": method, "source": str(source), **_rates(y[m], pred[m])}
            rows.append(r)
            if r["recall"] is not None:
                recalls.append((r["recall"], str(source)))
        if len(recalls) > 1:
            worst = min(recalls)
            rows.append({"lang": lang, "method": method, "source": f"worst: {worst[1]}", "recall": worst[0],
                         "all_sources_recall": _rates(y, pred)["recall"]})
    return rows


def out_of_source(df: pl.DataFrame, y: np.ndarray, groups: np.ndarray, ex, langs: list[str], *, seed: int = 0,
                  names=OUT_OF_SOURCE_METHODS) -> list[dict]:
    table = methods(seed)
    rows = []
    for lang in langs:
        d_idx, t_idx = split_indices(df, lang)
        sources = sorted(set(groups[d_idx].tolist()))
        if len(sources) < 2:
            continue
        for name in names:
            make, reads = table[name]
            X = ex.codes if reads == "sae" else ex.mean_acts
            full = make().fit(X[d_idx], y[d_idx])
            for s in sources:
                fit = d_idx[groups[d_idx] != s]
                test = t_idx[groups[t_idx] == s]
                if len(test) == 0 or len(set(y[fit].tolist())) < 2 or not y[test].any():
                    continue
                held = make().fit(X[fit], y[fit])
                i, h = _rates(y[test], full.predict(X[test])), _rates(y[test], held.predict(X[test]))
                rows.append({"lang": lang, "method": name, "held_out": str(s), "toxic": i["toxic"], "clean": i["clean"],
                             "recall_in_source": i["recall"], "recall_held_out": h["recall"],
                             "recall_kept": h["recall"] / i["recall"] if i["recall"] else None,
                             "fpr_in_source": i["fpr"], "fpr_held_out": h["fpr"],
                             "f1_held_out": binary_metrics(y[test], held.predict(X[test]))["f1"]})
    return rows


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def markdown(per: list[dict], oos: list[dict], column: str) -> list[str]:
    md = [f"## Per {column} (test split, each method at its own operating point)", "",
          "A rule that only learnt one source's style shows it here: the `worst:` row is the lowest recall of any "
          "source, beside the recall over all of the language's test rows.", "",
          "| lang | method | source | toxic | clean | recall | clean FPR |", "|---|---|---|---|---|---|---|"]
    for r in per:
        if r["source"].startswith("worst: "):
            md.append(f"| {r['lang']} | {r['method']} | **{r['source']}** | | | **{_f(r['recall'])}** "
                      f"(all: {_f(r['all_sources_recall'])}) | |")
        else:
            md.append(f"| {r['lang']} | {r['method']} | {r['source']} | {r['toxic']} | {r['clean']} | {_f(r['recall'])} | "
                      f"{_f(r['fpr'])} |")
    md += ["", f"## Leave one {column} out (fitted without it, scored on its test rows)", ""]
    if not oos:
        return md + [f"No language has discovery rows from two or more values of `{column}`.", ""]
    md += ["| lang | method | held out | recall fitted with it | recall held out | kept | clean FPR with / without |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['lang']} | {r['method']} | {r['held_out']} | {_f(r['recall_in_source'])} | {_f(r['recall_held_out'])} | "
           f"{_f(r['recall_kept'])} | {_f(r['fpr_in_source'])} / {_f(r['fpr_held_out'])} |" for r in oos]
    return md + [""]
