"""Classifiers over pooled SAE codes (CSR, texts x d_sae), scikit-learn style.

- ``OrRuleClassifier``: the Qwen-Scope rule. Rank features by delta_f = P(fires | toxic) -
  P(fires | clean), keep the top K, call a text toxic if any kept feature fires. Beyond the report,
  each kept feature may get its own firing threshold, chosen on the fitting data so that the feature
  alone fires on at most ``fpr_cap`` of the clean texts.
- ``SparseLinearClassifier``: L1 logistic regression on log1p(activations) with few non-zero
  weights; still explainable feature by feature (contribution = weight * log1p(act)).

Both serialise to plain dicts (``to_dict``/``from_dict``) for the classifier JSON file.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import SafetyScopeError

K_CANDIDATES = (1, 2, 5, 10)


def _check_Xy(X, y=None):
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X = X.tocsr()
    if y is None:
        return X, None
    y = np.asarray(y).astype(int)
    if X.shape[0] != len(y):
        raise SafetyScopeError(f"{X.shape[0]} rows of features but {len(y)} labels")
    if set(np.unique(y)) != {0, 1}:
        raise SafetyScopeError("fitting needs both toxic (1) and clean (0) examples")
    return X, y


def firing_rates(X: sp.csr_matrix, y: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """P(fires | toxic) and P(fires | clean) for every feature; fires = max activation > threshold."""
    fires = (X > threshold).astype(np.float32)
    p_tox = np.asarray(fires[y == 1].mean(axis=0)).ravel()
    p_clean = np.asarray(fires[y == 0].mean(axis=0)).ravel()
    return p_tox, p_clean


def rank_features(X, y, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Feature ids by descending delta (ties: lower id first), with delta, P(fire|toxic), P(fire|clean)."""
    p_tox, p_clean = firing_rates(X, y, threshold)
    delta = p_tox - p_clean
    order = np.lexsort((np.arange(len(delta)), -delta))
    return order, delta, p_tox, p_clean


def fpr_thresholds(X, y, features, base: float, fpr_cap: float | None) -> np.ndarray:
    """Per feature, the smallest threshold >= base at which it fires on at most fpr_cap of clean texts."""
    if fpr_cap is None:
        return np.full(len(features), base, dtype=np.float64)
    clean = X[y == 0][:, features].toarray()
    allowed = int(np.floor(fpr_cap * clean.shape[0]))
    out = []
    for j in range(len(features)):
        acts = np.sort(clean[:, j])[::-1]
        # firing means act > threshold, so threshold = the (allowed+1)-th largest clean activation
        t = acts[allowed] if allowed < len(acts) else 0.0
        out.append(max(base, float(t)))
    return np.array(out)


class OrRuleClassifier(ClassifierMixin, BaseEstimator):
    """Toxic if any selected feature's pooled activation exceeds its threshold.

    Parameters
    ----------
    max_features : int or None
        K. None chooses K from ``k_candidates`` by F1 on a held-back part of the fitting data.
    threshold : float
        Base firing threshold (the report uses 0).
    fpr_cap : float or None
        Per-feature thresholds capping each feature's clean-text firing rate; None = report rule.
    holdout : float
        Share held back for choosing K.
    """

    def __init__(self, max_features: int | None = None, threshold: float = 0.0, fpr_cap: float | None = 0.02,
                 k_candidates: tuple[int, ...] = K_CANDIDATES, holdout: float = 0.25, random_state: int = 0):
        self.max_features = max_features
        self.threshold = threshold
        self.fpr_cap = fpr_cap
        self.k_candidates = k_candidates
        self.holdout = holdout
        self.random_state = random_state

    def _fit_k(self, X, y, k):
        order, delta, p_tox, p_clean = rank_features(X, y, self.threshold)
        feats = order[:k]
        return feats, fpr_thresholds(X, y, feats, self.threshold, self.fpr_cap), delta, p_tox, p_clean

    def fit(self, X, y):
        X, y = _check_Xy(X, y)
        self.classes_ = np.array([0, 1])
        self.k_scores_ = {}
        if self.max_features is not None:
            if self.max_features < 1:
                raise SafetyScopeError("max_features must be >= 1")
            k = int(self.max_features)
            self.k_selection_ = "fixed"
        else:
            idx_fit, idx_val = train_test_split(np.arange(len(y)), test_size=self.holdout, stratify=y,
                                                random_state=self.random_state)
            Xf, yf, Xv, yv = X[idx_fit], y[idx_fit], X[idx_val], y[idx_val]
            order, _, _, _ = rank_features(Xf, yf, self.threshold)
            for k in self.k_candidates:
                feats = order[:k]
                thr = fpr_thresholds(Xf, yf, feats, self.threshold, self.fpr_cap)
                self.k_scores_[int(k)] = float(f1_score(yv, _or_predict(Xv, feats, thr), zero_division=0))
            k = max(self.k_scores_, key=lambda kk: (self.k_scores_[kk], -kk))  # best F1, then fewer features
            self.k_selection_ = f"F1 on a {self.holdout:.0%} stratified hold-out of the fitting data (seed {self.random_state})"
        feats, thr, delta, p_tox, p_clean = self._fit_k(X, y, k)
        self.features_, self.thresholds_ = feats.astype(np.int64), thr
        self.delta_, self.p_toxic_, self.p_clean_ = delta[feats], p_tox[feats], p_clean[feats]
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        """max over selected features of (activation - threshold): > 0 exactly when predicted toxic.
        With thresholds of 0 this is the max activation over the selected features."""
        X, _ = _check_Xy(X)
        sub = X[:, self.features_].toarray()
        return (sub - self.thresholds_[None, :]).max(axis=1)

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features that fire."""
        X, _ = _check_Xy(X)
        sub = X[:, self.features_].toarray() > self.thresholds_[None, :]
        return [self.features_[row].tolist() for row in sub]

    def to_dict(self) -> dict:
        feats = [{"id": int(f), "threshold": float(t), "delta": float(d), "p_fire_toxic": float(pt),
                  "p_fire_clean": float(pc)}
                 for f, t, d, pt, pc in zip(self.features_, self.thresholds_, self.delta_, self.p_toxic_, self.p_clean_)]
        return {"kind": "or_rule", "params": self.get_params(), "features": feats, "n_features_in": self.n_features_in_,
                "k": len(feats), "k_selection": self.k_selection_, "k_scores": self.k_scores_}

    @classmethod
    def from_dict(cls, d: dict) -> "OrRuleClassifier":
        params = dict(d["params"])
        params["k_candidates"] = tuple(params.get("k_candidates", K_CANDIDATES))
        clf = cls(**params)
        f = d["features"]
        clf.classes_ = np.array([0, 1])
        clf.features_ = np.array([x["id"] for x in f], dtype=np.int64)
        clf.thresholds_ = np.array([x["threshold"] for x in f], dtype=np.float64)
        clf.delta_ = np.array([x["delta"] for x in f])
        clf.p_toxic_ = np.array([x["p_fire_toxic"] for x in f])
        clf.p_clean_ = np.array([x["p_fire_clean"] for x in f])
        clf.n_features_in_ = d["n_features_in"]
        clf.k_selection_, clf.k_scores_ = d.get("k_selection", ""), {int(k): v for k, v in d.get("k_scores", {}).items()}
        return clf


def _or_predict(X, feats, thr) -> np.ndarray:
    return (X[:, feats].toarray() > thr[None, :]).any(axis=1).astype(int)


class SparseLinearClassifier(ClassifierMixin, BaseEstimator):
    """L1 logistic regression on log1p of pooled SAE activations, keeping at most ``max_features`` weights.

    C is chosen by stratified cross-validation F1 among the values whose fit keeps at most
    ``max_features`` non-zero weights (``C`` fixes it instead).
    """

    def __init__(self, max_features: int = 64, C: float | None = None, cv: int = 3, min_df: int = 3,
                 random_state: int = 0):
        self.max_features = max_features
        self.C = C
        self.cv = cv
        self.min_df = min_df
        self.random_state = random_state

    @staticmethod
    def _transform(X):
        X = X.copy()
        X.data = np.log1p(np.maximum(X.data, 0))
        return X

    def _lr(self, C):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=self.random_state)

    def fit(self, X, y):
        X, y = _check_Xy(X, y)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        Xt = self._transform(X)
        df = np.asarray((X > 0).sum(axis=0)).ravel()
        cols = np.flatnonzero(df >= self.min_df)  # features that almost never fire carry no signal
        Xc = Xt[:, cols]
        if self.C is not None:
            C = float(self.C)
            self.C_scores_ = {}
        else:
            skf = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
            self.C_scores_ = {}
            for C in np.logspace(-2, 1, 7):
                nnz = np.count_nonzero(self._lr(C).fit(Xc, y).coef_)
                if nnz > self.max_features or nnz == 0:
                    continue
                f1s = [f1_score(y[te], self._lr(C).fit(Xc[tr], y[tr]).predict(Xc[te]), zero_division=0)
                       for tr, te in skf.split(Xc, y)]
                self.C_scores_[float(C)] = float(np.mean(f1s))
            if not self.C_scores_:
                C = 0.01
            else:
                C = max(self.C_scores_, key=lambda c: (self.C_scores_[c], -c))
        lr = self._lr(C).fit(Xc, y)
        coef = lr.coef_.ravel()
        keep = np.flatnonzero(coef)
        keep = keep[np.argsort(-np.abs(coef[keep]))][: self.max_features]
        self.C_ = C
        self.features_ = cols[keep].astype(np.int64)
        self.weights_ = coef[keep].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def decision_function(self, X) -> np.ndarray:
        X, _ = _check_Xy(X)
        sub = np.log1p(np.maximum(X[:, self.features_].toarray(), 0))
        return sub @ self.weights_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features with a positive weight that are active (push towards toxic)."""
        X, _ = _check_Xy(X)
        act = X[:, self.features_].toarray() > 0
        pos = self.weights_ > 0
        return [self.features_[row & pos].tolist() for row in act]

    def to_dict(self) -> dict:
        feats = [{"id": int(f), "weight": float(w)} for f, w in zip(self.features_, self.weights_)]
        return {"kind": "sparse_linear", "params": self.get_params(), "features": feats, "intercept": self.intercept_,
                "C": self.C_, "C_scores": self.C_scores_, "n_features_in": self.n_features_in_, "k": len(feats),
                "k_selection": f"L1 path, C by {self.cv}-fold CV F1 with <= {self.max_features} non-zero weights"}

    @classmethod
    def from_dict(cls, d: dict) -> "SparseLinearClassifier":
        clf = cls(**d["params"])
        clf.classes_ = np.array([0, 1])
        clf.features_ = np.array([x["id"] for x in d["features"]], dtype=np.int64)
        clf.weights_ = np.array([x["weight"] for x in d["features"]], dtype=np.float64)
        clf.intercept_, clf.C_, clf.C_scores_ = d["intercept"], d["C"], d.get("C_scores", {})
        clf.n_features_in_ = d["n_features_in"]
        return clf


KINDS = {"or_rule": OrRuleClassifier, "sparse_linear": SparseLinearClassifier}


def classifier_from_dict(d: dict):
    if d.get("kind") not in KINDS:
        raise SafetyScopeError(f"unknown classifier kind {d.get('kind')!r}; expected one of {sorted(KINDS)}")
    return KINDS[d["kind"]].from_dict(d)
