"""Why a text was (not) flagged, in numbers a person can check: each feature's share of the verdict (OR-rule: its
activation against its threshold; sparse linear and linear: weight x log1p(activation)), the intercept and the sum
that gives the score, the tokens where each feature fires, and each feature's readable name (naming.py)."""

from __future__ import annotations

import numpy as np

from .detector import UNVALIDATED, Detector, evidence
from .naming import feature_name
from .rules import LinearProbeClassifier, OrRuleClassifier, rule_inputs

SHOWN_NEGATIVE = 5  # a linear rule: the active features pulling hardest towards clean shown beside the evidence


def explain_text(det: Detector, text: str | None, lang: str | None = None) -> dict:
    """``lang``: the text's language (None: identified offline); language, status, rule and score exactly as
    classify gives them (``Detector.languages_and_status``, ``Detector.rule_for``, the pooled codes of ``extract``)."""
    (lang,), (status,) = det.languages_and_status([text], None if lang is None else [lang])
    out: dict = {"text": text, "lang": lang, "status": status}
    if det.rules_by_lang:  # which rule gave the verdict: the language's own or the fallback
        out["rule"] = lang if lang in det.rules_by_lang else "fallback"
    if status not in ("ok", UNVALIDATED):
        return {**out, "toxic": None, "score": None, "kind": None, "evidence_features": [], "features": []}
    rule = det.rule_for(lang)
    ex = det.extractor.extract([text])
    X = rule_inputs(rule, ex.codes, ex.mean_acts)
    score = float(rule.decision_function(X)[0])
    fired = [int(f) for f in rule.fired(X)[0]]
    acts = ex.codes[0].toarray()[0]  # each SAE feature's pooled activation: what the rule reads
    if isinstance(rule, OrRuleClassifier):
        kind, feats, parts = "or_rule", _or_rule(rule, acts), {}
    elif isinstance(rule, LinearProbeClassifier):
        kind, (feats, parts) = "linear", _linear(rule, X, acts, set(fired))
    else:
        kind, (feats, parts) = "sparse_linear", _sparse(rule, acts, set(fired))
    tokens, codes = det.extractor.token_codes(text)  # (n_tokens, d_sae): where in the text each feature fires
    for e in feats:
        col = codes[:, e["id"]].numpy()
        cut = e["threshold"] if e.get("fired") and "threshold" in e else 0.0
        pos = np.flatnonzero(col > cut)
        e["tokens"] = [{"position": int(p), "token": tokens[p], "act": float(col[p])} for p in pos[np.argsort(-col[pos])]]
        e["name"] = feature_name(det.meta, e["id"])
    toxic = score > 0
    out.update(toxic=toxic, score=score, kind=kind, evidence_features=evidence(toxic, fired), features=feats)
    if parts:
        out["score_parts"] = parts
    return out


def _or_rule(rule, acts) -> list[dict]:
    """Every feature of the rule: activation - threshold (the score is the largest; toxic when one is > 0)."""
    feats = []
    for f, t in zip(rule.features_, rule.thresholds_):
        a = float(acts[f])
        feats.append({"id": int(f), "max_act": a, "threshold": float(t), "margin": a - float(t), "fired": bool(a > t)})
    return sorted(feats, key=lambda e: -e["margin"])


def _entry(f: int, a: float, w: float, fired: set) -> dict:
    return {"id": int(f), "max_act": a, "weight": w, "contribution": w * float(np.log1p(a)), "fired": int(f) in fired}


def _sparse(rule, acts, fired: set) -> tuple[list[dict], dict]:
    """Every active feature of the rule: score = intercept + sum of weight x log1p(activation)."""
    feats = [_entry(f, float(acts[f]), float(w), fired) for f, w in zip(rule.features_, rule.weights_) if acts[f] > 0]
    feats.sort(key=lambda e: -e["contribution"])
    return feats, {"intercept": float(rule.intercept_), "sae_features": sum(e["contribution"] for e in feats)}


def _linear(rule, X, acts, fired: set) -> tuple[list[dict], dict]:
    """The evidence (largest positive contributions, ``fired``) and the SHOWN_NEGATIVE most negative ones; the
    other active features' sum and the mean residual's share complete the score."""
    D = rule._design(X)[0]
    n = rule.n_codes
    active = np.flatnonzero(acts[:n] > 0)
    every = [_entry(f, float(acts[f]), float(rule.weights_[f]), fired) for f in active]
    neg = sorted((e for e in every if e["contribution"] < 0), key=lambda e: e["contribution"])[:SHOWN_NEGATIVE]
    feats = sorted([e for e in every if e["fired"]], key=lambda e: -e["contribution"]) + neg
    sae = float(D[:n] @ rule.weights_[:n])
    shown = sum(e["contribution"] for e in feats)
    return feats, {"intercept": float(rule.intercept_), "sae_features": sae, "shown_features": shown,
                   "other_features": sae - shown, "other_active": len(every) - len(feats),
                   "mean_residual": float(D[n:] @ rule.weights_[n:])}
