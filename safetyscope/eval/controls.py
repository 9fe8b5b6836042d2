"""Random controls: is the trained SAE doing the work? (Korznikov et al. 2026 found SAEs with random weights
match trained ones on sparse probing.)

Each control is scored on the same test rows as the trained SAE's rule it stands beside:
- ``random_sae_or_rule`` vs ``or_rule`` and ``random_sae_sparse_linear`` vs ``sparse_linear``: the same
  rule fitted on the codes of an untrained SAE of the same shapes (``SAE.random_like``);
- ``control_random_features`` vs ``or_rule``: the OR-rule's K with random features at its clean firing rates.

The rule for "beats": a paired bootstrap of the test rows (the same resamples for both methods) gives a 95 %
interval for trained minus control on F1 and on recall at 5 % clean FPR. The trained SAE *beats* a control
when an interval lies above 0 and none below, *loses to* it in the mirror case, and otherwise does not
clearly beat it (a difference inside the resampling noise of the test split). The macro interval resamples
each language's test rows and averages the languages' differences.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from .metrics import FPR_POINTS

CONTROLS = (("or_rule", "random_sae_or_rule", "the random-weight SAE's OR-rule"),
            ("or_rule", "control_random_features", "random features at its OR-rule's clean firing rates"),
            ("sparse_linear", "random_sae_sparse_linear", "the random-weight SAE's sparse linear rule"))
METHODS = ["or_rule", "random_sae_or_rule", "control_random_features", "sparse_linear", "random_sae_sparse_linear"]
METRICS = ("f1", "recall_at_5pct_fpr", "roc_auc")
VERDICT_METRICS = ("f1", "recall_at_5pct_fpr")
LABELS = {"f1": "F1", "recall_at_5pct_fpr": "recall@5%FPR", "roc_auc": "ROC-AUC"}
N_BOOT = 1000
assert 0.05 in FPR_POINTS  # recall_at_5pct_fpr is one of binary_metrics' points


def resampled_metrics(y, pred, score, idx: np.ndarray) -> dict[str, np.ndarray]:
    """F1 at the method's own predictions, recall at 5 % clean FPR and ROC-AUC on each resample (a row of
    ``idx``, indices into the test rows): the definitions of ``metrics.binary_metrics``, vectorised over
    resamples. NaN where a resample lacks a class (no ROC curve)."""
    yt, p = np.asarray(y)[idx].astype(bool), np.asarray(pred)[idx].astype(bool)
    s = np.asarray(score, dtype=float)[idx]
    tp, fp, fn = (yt & p).sum(1), (~yt & p).sum(1), (yt & ~p).sum(1)
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    n_pos, n_neg = yt.sum(1), (~yt).sum(1)
    both = (n_pos > 0) & (n_neg > 0)
    # Mann-Whitney: the AUC is the rank sum of the toxic rows (ties share their mean rank)
    auc = ((rankdata(s, axis=1) * yt).sum(1) - n_pos * (n_pos + 1) / 2) / np.maximum(n_pos * n_neg, 1)
    # the best threshold flags at most m clean rows: it lies just above the (m+1)-th highest clean score
    m = np.floor((0.05 + 1e-12) * n_neg).astype(int)
    clean_desc = -np.sort(np.where(yt, np.inf, -s), axis=1)  # clean scores high to low, then -inf
    cut = np.where(m < n_neg, clean_desc[np.arange(len(s)), np.minimum(m, s.shape[1] - 1)], -np.inf)
    recall = ((s > cut[:, None]) & yt).sum(1) / np.maximum(n_pos, 1)
    return {"f1": f1, "recall_at_5pct_fpr": np.where(both, recall, np.nan), "roc_auc": np.where(both, auc, np.nan)}


def compare_controls(outputs: dict, langs: list[str], *, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """``outputs``: {(lang, method): (test labels, predictions, scores)} from ``evaluate_languages``.
    Per language and macro, per control present: trained, control, their difference and its 95 % interval
    per metric, and the verdict (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = {"n_boot": n_boot, "langs": {}, "macro": {}}
    boot: dict[str, dict[str, list[np.ndarray]]] = {}
    for lang in langs:
        present = [c for c in CONTROLS if (lang, c[0]) in outputs and (lang, c[1]) in outputs]
        if not present:
            continue
        n = len(outputs[(lang, present[0][0])][0])
        idx = np.vstack([np.arange(n), rng.integers(0, n, size=(n_boot, n))])  # row 0: the test split itself
        out["langs"][lang] = {}
        for trained, control, _ in present:
            a, b = resampled_metrics(*outputs[(lang, trained)], idx), resampled_metrics(*outputs[(lang, control)], idx)
            entry = {}
            for metric in METRICS:
                diff = a[metric] - b[metric]
                boot.setdefault(control, {}).setdefault(metric, []).append(diff)
                entry[metric] = _summary(a[metric][0], b[metric][0], diff)
            entry["verdict"] = _verdict(entry)
            out["langs"][lang][control] = entry
    for control, by_metric in boot.items():
        if len(by_metric["f1"]) != len(out["langs"]):
            continue  # a control missing in some language has no macro
        entry = {}
        for metric, diffs in by_metric.items():
            stack = np.vstack(diffs)  # (languages, 1 + n_boot): each resample's mean over the languages
            count = (~np.isnan(stack)).sum(0)
            diff = np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)
            point = [out["langs"][g][control][metric] for g in out["langs"]]
            entry[metric] = _summary(_mean([p["trained"] for p in point]), _mean([p["control"] for p in point]), diff)
        entry["verdict"] = _verdict(entry)
        out["macro"][control] = entry
    return out


def _summary(trained, control, diff) -> dict:
    rest = diff[1:][~np.isnan(diff[1:])]
    lo, hi = (np.percentile(rest, [2.5, 97.5]) if len(rest) else (math.nan, math.nan))
    return {"trained": _num(trained), "control": _num(control), "diff": _num(diff[0]), "ci95": [_num(lo), _num(hi)]}


def _mean(vals) -> float:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def _num(v) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def _verdict(entry: dict) -> str:
    ci = [entry[m]["ci95"] for m in VERDICT_METRICS if entry[m]["ci95"][0] is not None]
    better, worse = any(lo > 0 for lo, _ in ci), any(hi < 0 for _, hi in ci)
    if better and not worse:
        return "beats"
    if worse and not better:
        return "loses to"
    return "does not clearly beat"


def sentence(where: str, entries: dict) -> str:
    """One plain sentence: how the trained SAE fares against each control in ``entries``."""
    parts = []
    for _, control, what in CONTROLS:
        e = entries.get(control)
        if e is None:
            continue
        nums = "; ".join(f"{LABELS[m]} {_signed(e[m]['diff'])} [{_signed(e[m]['ci95'][0])}, {_signed(e[m]['ci95'][1])}]"
                         for m in VERDICT_METRICS)
        parts.append(f"{e['verdict']} {what} ({nums})")
    if not parts:
        return ""
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{where}: the trained SAE {body}."


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def sentences(controls: dict) -> list[str]:
    out = [sentence(lang, e) for lang, e in controls["langs"].items()]
    if controls["macro"]:
        out.append(sentence("macro", controls["macro"]))
    return [s for s in out if s]


EXPLAIN = ("Is the SAE doing the work? Each trained-SAE rule beside the same rule on an untrained SAE of the same "
           "shapes, k and layer (`random_sae_or_rule`, `random_sae_sparse_linear`: random unit decoder directions, "
           "encoder tied to them with the "
           "trained encoder's row norms, the trained b_dec as centre; seeded by `--seed`) and beside "
           "`control_random_features` (the OR-rule's K with random features thresholded to its clean firing "
           "rates), all fitted on the same discovery split and scored on the same test split. A verdict *beats* "
           "means a 95 % paired bootstrap interval ({n} resamples of the test rows) of trained minus control lies "
           "above 0 for F1 or recall at 5 % FPR and below 0 for neither; *loses to* the mirror; otherwise the "
           "difference is within the test split's noise ('does not clearly beat'). Brackets: the 95 % interval.")


def markdown(rows: list[dict], controls: dict) -> list[str]:
    from .per_language import markdown_table

    md = ["## Random controls (is the SAE doing the work?)", "", EXPLAIN.format(n=controls["n_boot"]), ""]
    md += [f"- {s}" for s in sentences(controls)] + [""]
    for metric in METRICS:
        md += [f"### Random controls: {metric}", "", markdown_table(rows, METHODS, metric), ""]
    return md


def html(rows: list[dict], controls: dict, langs: list[str], table) -> str:
    """``table(rows, methods, metric, langs)``: the report's per-language HTML table."""
    import re
    from html import escape

    def marked(text):  # the markdown's `code` and *emphasis*, as HTML
        return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text)))

    items = "".join(f"<li>{escape(s)}</li>" for s in sentences(controls))
    parts = [f"<p>{marked(EXPLAIN.format(n=controls['n_boot']))}</p><ul>{items}</ul>"]
    for metric in METRICS:
        parts.append(f"<h3>{escape(LABELS[metric])}</h3>{table(rows, METHODS, metric, langs)}")
    return "".join(parts)
