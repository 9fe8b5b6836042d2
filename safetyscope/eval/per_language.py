"""Per-language evaluation: discover on a language's discovery split, test on its test split, beside baselines.

Rows are (lang, method) with precision, recall, F1 and ROC-AUC, all measured on the same test split:
- ``or_rule``: the OR-rule with greedy selection of (feature, threshold) pairs, K chosen on held-back data;
- ``or_rule_delta``: top-K features by delta, each thresholded at a 2% clean firing rate;
- ``or_rule_report``: the report's plain rule (top-K by delta, threshold 0 for every feature);
- ``or_rule_K=k``: the K sweep of ``or_rule``;
- ``or_rule_fpr2``: ``or_rule`` at criterion recall_at_fpr, target FPR 0.02 (the ``discover`` default);
- ``control_random_features``: ``or_rule``'s K with random features matched to its clean firing rates (a control);
- ``sparse_linear``: L1 logistic rule with at most 128 SAE features;
- ``sparse_linear_fpr2``: ``sparse_linear`` with its threshold at a 2% out-of-fold clean firing rate (the
  ``discover --kind sparse_linear`` default operating point);
- ``random_sae_or_rule`` / ``random_sae_sparse_linear``: ``or_rule`` / ``sparse_linear`` on the codes of an
  untrained SAE of the same shapes (``SAE.random_like``), when its extraction is given - controls;
- ``logreg_sae``: L1 logistic regression on all SAE features (C by CV) - a baseline;
- ``probe_raw``: logistic probe on mean-pooled raw residual activations of the same layer - a baseline;
- ``majority``: the majority class of the discovery split - a baseline;
- ``shipped``: a given classifier (e.g. the shipped all-language one) applied as is; a per-language file
  scores each language with its own rule (its fallback rule for other languages).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ..data import parse_labels
from ..discovery.rules import (
    K_CANDIDATES,
    OrRuleClassifier,
    RandomMatchedOrRule,
    SparseLinearClassifier,
    best_layer,
    rank_features,
    rule_inputs,
)
from ..errors import SafetyScopeError
from ..features import Extraction
from .metrics import binary_metrics, majority_predict, raw_activation_probe


def methods(seed: int):
    """name -> (estimator factory, what it reads: "sae" codes, "raw" mean activations or "random_sae" codes)."""
    out = {
        "or_rule_fpr2": (lambda: OrRuleClassifier(criterion="recall_at_fpr", target_fpr=0.02, random_state=seed), "sae"),
        "or_rule": (lambda: OrRuleClassifier(random_state=seed), "sae"),
        "control_random_features": (lambda: RandomMatchedOrRule(random_state=seed), "sae"),
        "or_rule_delta": (lambda: OrRuleClassifier(selection="delta", random_state=seed), "sae"),
        "or_rule_report": (lambda: OrRuleClassifier(selection="delta", fpr_cap=None, random_state=seed), "sae"),
        "sparse_linear": (lambda: SparseLinearClassifier(max_features=128, random_state=seed), "sae"),
        "sparse_linear_fpr2": (lambda: SparseLinearClassifier(max_features=128, random_state=seed, target_fpr=0.02), "sae"),
        "logreg_sae": (lambda: SparseLinearClassifier(max_features=10**9, random_state=seed), "sae"),
        "probe_raw": (lambda: raw_activation_probe(seed), "raw"),
        "random_sae_or_rule": (lambda: OrRuleClassifier(random_state=seed), "random_sae"),
        "random_sae_sparse_linear": (lambda: SparseLinearClassifier(max_features=128, random_state=seed), "random_sae"),
    }
    for k in K_CANDIDATES:
        out[f"or_rule_K={k}"] = (lambda k=k: OrRuleClassifier(max_features=k, random_state=seed), "sae")
    return out


def split_indices(df: pl.DataFrame, lang: str) -> tuple[np.ndarray, np.ndarray]:
    lang_mask = (df.get_column("lang") == lang).to_numpy()
    split = df.get_column("split").to_numpy()
    return np.flatnonzero(lang_mask & (split == "discovery")), np.flatnonzero(lang_mask & (split == "test"))


def evaluate_languages(df: pl.DataFrame, ex: Extraction, *, langs: list[str] | None = None, seed: int = 0,
                       shipped=None, only: list[str] | None = None, progress: bool = True,
                       random_ex: Extraction | None = None, outputs: dict | None = None) -> list[dict]:
    """``df`` has text, label, lang, split; ``ex`` holds its features row for row, ``random_ex`` (optional)
    those of a random SAE (the ``random_sae_*`` methods run only with it). ``outputs``, when given, is
    filled with {(lang, method): (test labels, predictions, scores)} for paired comparisons. ``shipped``:
    language -> the rule of a given classifier that scores that language's rows."""
    for c in ("label", "lang", "split"):
        if c not in df.columns:
            raise SafetyScopeError(f"evaluation data needs a {c!r} column; columns present: {df.columns}")
    y = parse_labels(df.get_column("label"), "evaluation data")
    langs = langs or sorted(set(df.get_column("lang").to_list()))
    table = {k: v for k, v in methods(seed).items() if random_ex is not None or v[1] != "random_sae"}
    if only:
        unknown = sorted(set(only) - set(methods(seed)) - {"shipped"})
        if unknown:
            raise SafetyScopeError(f"--methods {unknown}: unknown; use any of {', '.join(methods(seed))}")
        table = {k: v for k, v in table.items() if k in only}
    rows = []
    for lang in tqdm(langs, desc="languages", disable=not progress):
        d_idx, t_idx = split_indices(df, lang)
        if len(d_idx) == 0 or len(t_idx) == 0 or len(set(y[d_idx])) < 2:
            continue
        for name, (make, source) in table.items():
            X = {"sae": ex.codes, "raw": ex.mean_acts}[source] if source != "random_sae" else random_ex.codes
            est = make().fit(X[d_idx], y[d_idx])
            score, pred = est.decision_function(X[t_idx]), est.predict(X[t_idx])
            rows.append({"lang": lang, "method": name, **binary_metrics(y[t_idx], pred, score)})
            if outputs is not None:
                outputs[(lang, name)] = (y[t_idx], pred, score)
        rows.append({"lang": lang, "method": "majority",
                     **binary_metrics(y[t_idx], majority_predict(y[d_idx], len(t_idx)))})
        if shipped is not None:
            rule = shipped(lang)
            score = rule.decision_function(rule_inputs(rule, ex.codes[t_idx], ex.mean_acts[t_idx]))
            rows.append({"lang": lang, "method": "shipped", **binary_metrics(y[t_idx], score > 0, score)})
            if outputs is not None:
                outputs[(lang, "shipped")] = (y[t_idx], score > 0, score)
    return rows


def markdown_table(rows: list[dict], methods_order: list[str], metric: str = "f1") -> str:
    langs = sorted({r["lang"] for r in rows})
    present = [m for m in methods_order if any(r["method"] == m for r in rows)]
    look = {(r["lang"], r["method"]): r for r in rows}
    lines = ["| lang | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for lang in langs + ["macro"]:
        cells = []
        for m in present:
            if lang == "macro":
                vals = [look[(la, m)][metric] for la in langs if (la, m) in look and metric in look[(la, m)]]
                cells.append(f"**{np.mean(vals):.3f}**" if vals else "")
            else:
                r = look.get((lang, m))
                cells.append(f"{r[metric]:.3f}" if r and metric in r else "")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_sweep(df: pl.DataFrame, codes_by_layer: dict, *, langs: list[str], seed: int = 0) -> dict:
    """Per language and layer: the best single-feature delta on the discovery split (the report's layer
    criterion) and the OR-rule's test F1; the layer each language's delta picks, and its F1."""
    y = parse_labels(df.get_column("label"), "evaluation data")
    layers = sorted(codes_by_layer)
    out = {"layers": layers, "best_delta": {}, "f1": {}, "chosen": {}}
    for lang in langs:
        d_idx, t_idx = split_indices(df, lang)
        if len(d_idx) == 0 or len(t_idx) == 0 or len(set(y[d_idx])) < 2:
            continue
        deltas, f1s = {}, {}
        for layer in layers:
            X = codes_by_layer[layer]
            order, delta, _, _ = rank_features(X[d_idx], y[d_idx])
            deltas[layer] = float(delta[order[0]])
            est = OrRuleClassifier(random_state=seed).fit(X[d_idx], y[d_idx])
            f1s[layer] = binary_metrics(y[t_idx], est.predict(X[t_idx]))["f1"]
        out["best_delta"][lang], out["f1"][lang] = deltas, f1s
        out["chosen"][lang] = best_layer(deltas)
    if out["f1"]:
        out["macro_f1"] = {la: float(np.mean([v[la] for v in out["f1"].values()])) for la in layers}
        out["macro_f1_chosen"] = float(np.mean([out["f1"][g][out["chosen"][g]] for g in out["f1"]]))
    return out
