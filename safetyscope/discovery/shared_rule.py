"""One rule for every language, with an operating point per language (`discover --per-language --shared-weights`).

Why: a rule fitted on one language's rows (a few thousand, from one to three sources) learns those sources, and a
word that only appears on one side of them carries the label; out of source such a rule flags a polite French
thank-you and misses a blatant English threat. One rule fitted on every language's rows sees each concept in many
languages and styles; each language weighs the same in the fit (and its two classes the same within it), so no
language's vocabulary can stand in for the label. What does differ by language is where the clean scores lie, so
each language gets its own threshold: the score at ``target_fpr`` of that language's out-of-fold clean scores.
"""

from __future__ import annotations

import copy

import numpy as np
from sklearn.base import clone

from ..errors import SafetyScopeError
from .rules import _weighted_rate_threshold, out_of_fold_scores


def language_balanced_weights(langs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row weights under which every language has the same total weight, split evenly between its toxic and its
    clean rows; normalised to mean 1 (so C means what it means unweighted)."""
    w = np.zeros(len(y))
    for lang in set(langs.tolist()):
        for c in (0, 1):
            m = (langs == lang) & (y == c)
            if m.any():
                w[m] = 1.0 / m.sum()
    return w * len(y) / w.sum()


def fit_shared(rule, X, y: np.ndarray, langs, target_fpr: float, *, cv: int = 3, seed: int = 0):
    """(fallback rule, {language: rule}, validation record). ``rule``: an unfitted weighted rule (linear or sparse
    linear); every returned rule has its weights and differs only in ``intercept_`` (its operating point).
    The fallback's threshold is set on the clean rows of all languages, each language weighing the same."""
    if "target_fpr" not in rule.get_params():
        raise SafetyScopeError("--shared-weights needs a weighted rule: --kind linear or --kind sparse_linear")
    langs = np.asarray(langs, dtype=object)
    y = np.asarray(y)
    sw = language_balanced_weights(langs, y)
    base = clone(rule).set_params(target_fpr=None).fit(X, y, sample_weight=sw)
    strata = np.array([f"{la}|{c}" for la, c in zip(langs.tolist(), y.tolist())])
    oof, _ = out_of_fold_scores(lambda tr, te: clone(base).fit(X[tr], y[tr], sample_weight=sw[tr]).decision_function(X[te]),
                                y, cv=cv, seed=seed, strata=strata)
    method = (f"{cv}-fold out-of-fold scores of one rule fitted on every language (each language and class "
              "weighing the same), folds stratified by language and label")

    def at_operating_point(rows: np.ndarray, where: str):
        clean, toxic = rows & (y == 0), rows & (y == 1)
        threshold = _weighted_rate_threshold(oof[clean], sw[clean], target_fpr)
        fired = oof > threshold
        r = copy.deepcopy(base)
        r.target_fpr = target_fpr
        r.intercept_ -= threshold
        r.operating_point_ = {"target_fpr": float(target_fpr), "threshold": float(threshold),
                              "oof_recall": float(np.average(fired[toxic], weights=sw[toxic])),
                              # weighted as the threshold was: every language's clean rows count the same
                              "oof_fpr": float(np.average(fired[clean], weights=sw[clean])),
                              "method": f"{method}; threshold on {where}", "sample_weight": True}
        return r

    fallback = at_operating_point(np.ones(len(y), dtype=bool), "the clean rows of every language")
    by_lang, per_lang = {}, {}
    for lang in sorted(set(langs.tolist())):
        rows = langs == lang
        by_lang[lang] = r = at_operating_point(rows, f"the clean rows of {lang}")
        per_lang[lang] = {"toxic": int((rows & (y == 1)).sum()), "clean": int((rows & (y == 0)).sum()),
                          "holdout_recall": r.operating_point_["oof_recall"],
                          "holdout_fpr": r.operating_point_["oof_fpr"], "k": int(len(r.features_)), "method": method}
    validation = {"languages": sorted(by_lang), "per_lang": per_lang,
                  "method": "one rule with shared weights, each language's own threshold; per language the "
                            f"out-of-fold recall and clean FPR at that threshold ({method})"}
    return fallback, by_lang, validation
