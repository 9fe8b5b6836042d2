"""Metrics and the plain baselines every SAE-rule result is shown beside (same split, same texts)."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def binary_metrics(y_true, y_pred, score=None) -> dict:
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "n": int(len(y_true)),
    }
    if score is not None and len(set(y_true.tolist())) == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, np.asarray(score, dtype=float)))
    return out


def raw_activation_probe(seed: int = 0):
    """Logistic probe on standardised mean-pooled residual activations; C by 3-fold CV F1."""
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return GridSearchCV(pipe, {"logisticregression__C": np.logspace(-3, 1, 5)}, scoring="f1",
                        cv=StratifiedKFold(3, shuffle=True, random_state=seed))


def majority_predict(y_fit, n: int) -> np.ndarray:
    return np.full(n, int(np.mean(y_fit) >= 0.5))
