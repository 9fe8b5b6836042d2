"""Why a text was (not) flagged: the selected features, the tokens where they fire, how strongly."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .detector import UNVALIDATED, Detector
from .rules import rule_inputs


def explain_text(det: Detector, text: str | None, lang: str | None = None) -> dict:
    """``lang``: the text's language; a per-language classifier identifies it when not given, and explains the
    rule of that language (else its fallback rule). Status as classify gives it."""
    if text is None or not str(text).strip():
        return {"text": text, "toxic": None, "score": None, "status": "null text" if text is None else "empty text",
                "features": []}
    if lang is None and det.rules_by_lang:
        from ..langid import identify

        lang = identify([text])[0]
    tokens, codes = det.extractor.token_codes(text)  # (n_tokens, d_sae)
    rule = det.rule_for(lang)
    ids, weights = rule.features_, getattr(rule, "weights_", None)
    if getattr(rule, "reads", "codes") != "codes":  # a linear rule also reads the mean residual: score as classify
        ex = det.extractor.extract([text])
        X = rule_inputs(rule, ex.codes, ex.mean_acts)
        ids = np.asarray(rule.fired(X)[0], dtype=np.int64)  # the active SAE features that push towards toxic
        weights = weights[ids]  # its weights are one per input column
    else:
        X = sp.csr_matrix(codes.amax(0).numpy()[None, :])
    score = float(rule.decision_function(X)[0])
    fired = set(rule.fired(X)[0])
    thresholds = getattr(rule, "thresholds_", np.zeros(len(ids)))
    feats = []
    for j, f in enumerate(ids):
        col = codes[:, int(f)].numpy()
        if col.max() <= 0:
            continue
        cut = thresholds[j] if weights is None else 0.0
        pos = np.flatnonzero(col > cut) if col.max() > cut else np.flatnonzero(col > 0)
        pos = pos[np.argsort(-col[pos])]
        entry = {"id": int(f), "fired": int(f) in fired, "max_act": float(col.max()),
                 "tokens": [{"position": int(p), "token": tokens[p], "act": float(col[p])} for p in pos]}
        if weights is None:
            entry["threshold"] = float(thresholds[j])
        else:
            entry["weight"] = float(weights[j])
            entry["contribution"] = float(weights[j] * np.log1p(col.max()))
        feats.append(entry)
    feats.sort(key=lambda e: (not e["fired"], -e.get("contribution", e["max_act"])))
    out = {"text": text, "toxic": score > 0, "score": score,
           "status": UNVALIDATED if lang is not None and lang not in det.validated_languages() else "ok",
           "features": feats}
    if lang is not None:
        out["lang"] = lang
    if det.rules_by_lang:  # which rule gave the verdict: the language's own or the fallback
        out["rule"] = lang if lang in det.rules_by_lang else "fallback"
    parts = score_parts(rule, X)
    if parts:
        out["score_parts"] = parts
    return out


def score_parts(rule, X) -> dict:
    """Where a weighted rule's score comes from, so it can be checked by hand: ``intercept`` (with the operating
    point's threshold folded in) + ``sae_features`` (every active feature's weight x log1p(activation)) +
    ``mean_residual`` (linear rules: the residual columns' share) = ``score``. Empty for OR-rules."""
    if not hasattr(rule, "intercept_"):
        return {}
    if hasattr(rule, "_design"):  # LinearProbeClassifier: one weight per input column
        D = rule._design(X)[0]
        n = rule.n_codes
        return {"intercept": float(rule.intercept_), "sae_features": float(D[:n] @ rule.weights_[:n]),
                "mean_residual": float(D[n:] @ rule.weights_[n:])}
    sub = np.log1p(np.maximum(X[:, rule.features_].toarray()[0], 0))
    return {"intercept": float(rule.intercept_), "sae_features": float(sub @ rule.weights_)}
