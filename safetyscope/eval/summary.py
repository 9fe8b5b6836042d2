"""What an evaluation report says first, computed from its results: what won and by how much, against which
baselines and controls, and where a method is *not* better than one (at or below the majority baseline, a control
not clearly beaten); and what every method name means."""

from __future__ import annotations

import numpy as np

GLOSSARY = {
    "shipped": "the classifier given with `-c`, applied as is (a per-language file: each language's own rule)",
    "or_rule_fpr2": "OR-rule (greedy), K chosen for the most recall at <= 2 % clean FPR on hold-outs: the `discover` "
                    "default",
    "or_rule": "OR-rule: toxic if any of K SAE features fires above its threshold; greedy feature + threshold "
               "selection, K by hold-out F1",
    "or_rule_delta": "OR-rule of the top K features by delta = P(fires | toxic) - P(fires | clean), each thresholded "
                     "at a 2 % clean firing rate",
    "or_rule_report": "the Qwen-Scope report's rule: top K features by delta, threshold 0",
    "or_rule_K=k": "`or_rule` with K fixed (the K sweep)",
    "sparse_linear": "L1 logistic regression on log1p of at most 128 SAE features' activations",
    "sparse_linear_fpr2": "`sparse_linear` thresholded at a 2 % out-of-fold clean firing rate "
                          "(the `discover --kind sparse_linear` default)",
    "logreg_sae": "baseline: L1 logistic regression on all SAE features",
    "probe_raw": "baseline: logistic probe on the mean-pooled raw activations of the same layer (no SAE)",
    "majority": "baseline: always the discovery split's majority class (flagging everything scores F1 0.667 on a "
                "balanced test split)",
    "random_sae_or_rule": "control: `or_rule` on the codes of an untrained SAE of the same shapes",
    "random_sae_sparse_linear": "control: `sparse_linear` on an untrained SAE's codes",
    "control_random_features": "control: `or_rule`'s K with random features at its clean firing rates",
}
SAE_METHODS = ("shipped", "or_rule_fpr2", "or_rule", "or_rule_delta", "or_rule_report", "sparse_linear",
               "sparse_linear_fpr2")
BASELINES = ("logreg_sae", "probe_raw", "majority")
# set beside the majority baseline's F1: the SAE methods at an F1 operating point (the *_fpr2 ones and
# or_rule_delta trade F1 for a low clean firing rate by design, so a low F1 there is no failure)
F1_METHODS = ("shipped", "or_rule", "or_rule_report", "sparse_linear")
CONTROL_NAMES = {"random_sae_or_rule": "the random-weight SAE (`random_sae_or_rule` vs `or_rule`)",
                 "control_random_features": "random features (`control_random_features` vs `or_rule`)",
                 "random_sae_sparse_linear": "the random-weight SAE (`random_sae_sparse_linear` vs `sparse_linear`)"}


def glossary(methods) -> list[tuple[str, str]]:
    """(name, meaning) of each method present (the K sweep under one entry)."""
    seen = list(dict.fromkeys("or_rule_K=k" if m.startswith("or_rule_K=") else m for m in methods))
    return [(m, GLOSSARY[m]) for m in GLOSSARY if m in seen]


def macro(rows: list[dict], metric: str) -> dict[str, float]:
    """Per method, the mean of ``metric`` over the languages that have it."""
    vals: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(metric)
        if v is not None and not np.isnan(v):
            vals.setdefault(r["method"], []).append(float(v))
    return {m: float(np.mean(v)) for m, v in vals.items()}


def _best(scores: dict, among) -> tuple[str, float] | None:
    present = [(m, scores[m]) for m in among if m in scores]
    return max(present, key=lambda x: x[1]) if present else None


def _langs(items: list[str], total: int) -> str:
    return f"{len(items)} of {total} languages ({', '.join(items)})"


def summary(results: dict) -> list[str]:
    """3-5 lines of markdown: the winner by macro F1 and the best SAE method against the baselines; recall at 5 %
    clean FPR; where an SAE method is at or below the majority baseline's F1; each random control's verdicts."""
    rows = results["per_language"]
    langs = sorted({r["lang"] for r in rows})
    out = []
    f1 = macro(rows, "f1")
    sae, base = _best(f1, SAE_METHODS), _best(f1, BASELINES[:-1])
    if sae:
        line = f"Best SAE method by macro F1 over {len(langs)} language(s): `{sae[0]}` {sae[1]:.3f}"
        if base:
            line += (f"; {'ahead of' if sae[1] > base[1] else 'behind'} the best baseline `{base[0]}` ({base[1]:.3f}) by "
                     f"{abs(sae[1] - base[1]):.3f}")
        if "majority" in f1:
            line += f"; majority baseline {f1['majority']:.3f}"
        rec = macro(rows, "recall_at_5pct_fpr")
        r_sae, r_base = _best(rec, SAE_METHODS), _best(rec, BASELINES[:-1])
        if r_sae and r_base:
            line += f". Recall at 5 % clean FPR: best SAE method `{r_sae[0]}` {r_sae[1]:.3f}, best baseline `{r_base[0]}` {r_base[1]:.3f}"
        out.append(line + ".")
    major = {r["lang"]: r["f1"] for r in rows if r["method"] == "majority"}
    low = []
    for m in F1_METHODS:
        at = [f"{r['lang']} {r['f1']:.3f}" for r in rows if r["method"] == m and r["lang"] in major
              and r["f1"] <= major[r["lang"]] + 5e-4]
        if at:
            low.append(f"`{m}` in {', '.join(at)}")
    span = sorted({f"{v:.3f}" for v in major.values()})
    span_text = span[0] if len(span) == 1 else f"{span[0]}-{span[-1]}" if span else ""
    if low:
        out.append(f"**At or below the majority baseline's F1** ({span_text}, flagging every text): " + "; ".join(low)
                   + ".")
    elif major:
        out.append(f"Every SAE method at an F1 operating point is above the majority baseline's F1 ({span_text}) in "
                   "every language.")
    ctl = results.get("random_controls") or {}
    for control, what in CONTROL_NAMES.items():
        verdicts = {g: e[control]["verdict"] for g, e in ctl.get("langs", {}).items() if control in e}
        if not verdicts:
            continue
        unclear = [g for g, v in verdicts.items() if v != "beats"]
        lost = [g for g, v in verdicts.items() if v == "loses to"]
        m = ctl.get("macro", {}).get(control)
        tail = f"; macro: {m['verdict']} (F1 {m['f1']['diff']:+.3f})" if m else ""
        if unclear:
            out.append(f"**Not clearly better than {what}** in {_langs(unclear, len(verdicts))}"
                       + (f", worse in {', '.join(lost)}" if lost else "") + tail + ".")
        else:
            out.append(f"Beats {what} in all {len(verdicts)} languages{tail}.")
    return out
