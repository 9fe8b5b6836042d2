"""Metrics and the plain baselines every SAE-rule result is shown beside (same split, same texts)."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PREVALENCES = (0.05, 0.10)  # toxic share of real traffic: a few per cent, not the balanced splits' 50 %
FPR_POINTS = (0.01, 0.05)


def precision_at_prevalence(tpr: float, fpr: float, prevalence: float) -> float:
    """Precision the operating point (tpr, fpr) would have on data with this toxic share:
    p*TPR / (p*TPR + (1-p)*FPR). TPR and FPR do not depend on the class balance, precision does;
    0 when the rule flags nothing."""
    flagged = prevalence * tpr + (1 - prevalence) * fpr
    return float(prevalence * tpr / flagged) if flagged > 0 else 0.0


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a rate k/n: a flag rate on 125 prompts is a sample, and the
    Wilson interval stays inside [0, 1] and is sensible near 0 (unlike the normal approximation). (0, 1) for n=0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def recall_at_fpr(y_true, score, max_fpr: float) -> float:
    """The highest recall any threshold on ``score`` reaches while at most ``max_fpr`` of clean rows score above it."""
    from sklearn.metrics import roc_curve

    # every threshold: the collinear points roc_curve drops by default can hold the best recall under the cap
    fpr, tpr, _ = roc_curve(y_true, score, drop_intermediate=False)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def binary_metrics(y_true, y_pred, score=None) -> dict:
    """Metrics at the method's own operating point (y_pred), and threshold-free ones from ``score``.

    ``fpr`` is the clean firing rate; ``precision_at_5pct``/``_10pct`` are the precision the same TPR and FPR
    give at 5 % / 10 % toxic prevalence (precision_at_prevalence); ``recall_at_1pct_fpr``/``_5pct_fpr``
    the best recall of any threshold on the score within that clean firing rate."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    pos, neg = y_true == 1, y_true == 0
    tpr = float(y_pred[pos].mean()) if pos.any() else 0.0
    fpr = float(y_pred[neg].mean()) if neg.any() else 0.0
    out = {
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "fpr": fpr,
        "balanced_accuracy": (tpr + 1 - fpr) / 2,
        "n": int(len(y_true)),
    }
    for p in PREVALENCES:
        out[f"precision_at_{p * 100:g}pct"] = precision_at_prevalence(tpr, fpr, p)
    if score is not None and pos.any() and neg.any():
        score = np.asarray(score, dtype=float)
        out["roc_auc"] = float(roc_auc_score(y_true, score))
        out["average_precision"] = float(average_precision_score(y_true, score))
        for r in FPR_POINTS:
            out[f"recall_at_{r * 100:g}pct_fpr"] = recall_at_fpr(y_true, score, r)
    return out


def raw_activation_probe(seed: int = 0):
    """Logistic probe on standardised mean-pooled residual activations; C by 3-fold CV F1."""
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return GridSearchCV(pipe, {"logisticregression__C": np.logspace(-3, 1, 5)}, scoring="f1",
                        cv=StratifiedKFold(3, shuffle=True, random_state=seed))


def majority_predict(y_fit, n: int) -> np.ndarray:
    return np.full(n, int(np.mean(y_fit) >= 0.5))
