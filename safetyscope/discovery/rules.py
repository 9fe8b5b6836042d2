"""Classifiers over pooled SAE codes (CSR, texts x d_sae), scikit-learn style.

- ``OrRuleClassifier``: the Qwen-Scope rule: a text is toxic if any of K selected features fires.
  ``selection="delta"`` is the report's selection: rank features by delta_f = P(fires | toxic) -
  P(fires | clean) and keep the top K. ``selection="greedy"`` (default, beyond the report) adds one
  (feature, threshold) pair at a time, the one that most raises the F1 of the OR on the fitting data:
  top-delta features fire on the same toxic texts, so the K-th adds little recall, while greedy picks
  features that catch what the earlier ones miss. Thresholds come from capping each feature's own
  firing rate on clean texts (``fpr_cap``).
- ``SparseLinearClassifier``: L1 logistic regression on log1p(activations) with few non-zero
  weights; still explainable feature by feature (contribution = weight * log1p(act)).

Both serialise to plain dicts (``to_dict``/``from_dict``) for the classifier JSON file.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from ..errors import SafetyScopeError

K_CANDIDATES = (1, 2, 5, 10)
# Clean firing rates greedy selection may give a single feature (those <= fpr_cap are tried).
RATE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_FPR_CAP = {"greedy": 0.2, "delta": 0.02}
# Fewest rows of each class a classifier is fitted on: 3 stratified hold-outs / CV folds need a few of each.
MIN_PER_CLASS = 5


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


def _check_enough_for_holdouts(y: np.ndarray, what: str) -> None:
    n_toxic, n_clean = int(y.sum()), int(len(y) - y.sum())
    if min(n_toxic, n_clean) < MIN_PER_CLASS:
        raise SafetyScopeError(f"choosing {what} on stratified hold-outs needs at least {MIN_PER_CLASS} toxic and "
                               f"{MIN_PER_CLASS} clean examples; got {n_toxic} toxic, {n_clean} clean")


# Dense (rows x selected features) blocks are built this many values at a time: a classifier over 10^6
# features must not allocate rows x 10^6 floats at once.
DENSE_BLOCK = 1 << 22


def _dense_blocks(X: sp.csr_matrix, features: np.ndarray):
    """(row slice, dense X[rows, features]) in row blocks of at most DENSE_BLOCK values."""
    step = max(1, DENSE_BLOCK // max(1, len(features)))
    sub = X[:, features]  # still sparse: one column selection, densified a block of rows at a time
    for start in range(0, X.shape[0], step):
        rows = slice(start, min(start + step, X.shape[0]))
        yield rows, sub[rows].toarray()


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
    return _rate_thresholds(X[y == 0][:, features].toarray(), base, fpr_cap)


def _rate_thresholds(clean: np.ndarray, base: float, rate: float) -> np.ndarray:
    """Per column of clean activations, the smallest threshold >= base firing on at most ``rate`` of rows."""
    allowed = int(np.floor(rate * clean.shape[0]))
    if allowed >= clean.shape[0]:
        return np.full(clean.shape[1], base, dtype=np.float64)
    # firing means act > threshold, so threshold = the (allowed+1)-th largest clean activation
    kth = -np.partition(-clean, allowed, axis=0)[allowed]
    return np.maximum(base, kth).astype(np.float64)


def greedy_select(X, y, k: int, base: float, fpr_cap: float | None, max_candidates: int = 256):
    """Forward selection of (feature, threshold) pairs for an OR-rule, best F1 on (X, y) at each step.

    Candidates: the ``max_candidates`` features of highest delta (bounded memory: one dense
    rows x candidates block), each at the thresholds capping its clean firing rate at every rate of
    RATE_GRID up to ``fpr_cap`` (None: also the base threshold). Returns feature ids and thresholds in
    the order they were added, so the first k' of them are the greedy rule of size k'.
    """
    order, _, _, _ = rank_features(X, y, base)
    cols = order[:max_candidates]
    A = X[:, cols].toarray()
    toxic = y == 1
    rates = [r for r in RATE_GRID if fpr_cap is None or r <= fpr_cap] + ([1.0] if fpr_cap is None else [])
    thr_grid = np.stack([_rate_thresholds(A[~toxic], base, r) for r in rates])  # rates x candidates
    covered = np.zeros(len(y), dtype=bool)
    feats, thrs = [], []
    for _ in range(min(k, len(cols))):
        best = (-1.0, 0, 0)
        used = np.isin(cols, feats)  # each feature once
        for g, thr in enumerate(thr_grid):
            fires = (A > thr[None, :]) | covered[:, None]
            tp = fires[toxic].sum(axis=0)
            fp = fires[~toxic].sum(axis=0)
            f1 = 2 * tp / np.maximum(2 * tp + fp + (toxic.sum() - tp), 1)
            f1[used] = -1.0
            j = int(np.argmax(f1))  # ties: the higher-delta feature
            if f1[j] > best[0]:
                best = (float(f1[j]), g, j)
        _, g, j = best
        feats.append(int(cols[j]))
        thrs.append(float(thr_grid[g, j]))
        covered |= A[:, j] > thr_grid[g, j]
    return np.array(feats, dtype=np.int64), np.array(thrs)


class OrRuleClassifier(ClassifierMixin, BaseEstimator):
    """Toxic if any selected feature's pooled activation exceeds its threshold.

    Parameters
    ----------
    max_features : int or None
        K. None chooses K from ``k_candidates`` by F1 on a held-back part of the fitting data.
    selection : "greedy" or "delta"
        How the K features are picked (module docstring); "delta" is the Qwen-Scope report's ranking.
    threshold : float
        Base firing threshold (the report uses 0).
    fpr_cap : float, None or "auto"
        Largest share of clean texts one selected feature may fire on; its threshold is raised until it
        does not fire on more. "delta" uses exactly this cap; "greedy" tries the rates of RATE_GRID up to
        it. None: no cap (for "delta", threshold = ``threshold`` for all: the report's rule).
        "auto": 0.2 for greedy, 0.02 for delta.
    holdout : float
        Share held back for choosing K.
    n_splits : int
        K is chosen by the mean hold-out F1 over this many seeded stratified splits: one small hold-out
        is noisy enough to pick a K whose extra features only fit the sample.
    """

    def __init__(self, max_features: int | None = None, selection: str = "greedy", threshold: float = 0.0,
                 fpr_cap: float | None | str = "auto", k_candidates: tuple[int, ...] = K_CANDIDATES,
                 holdout: float = 0.25, n_splits: int = 3, max_candidates: int = 256, random_state: int = 0):
        self.max_features = max_features
        self.selection = selection
        self.threshold = threshold
        self.fpr_cap = fpr_cap
        self.k_candidates = k_candidates
        self.holdout = holdout
        self.n_splits = n_splits
        self.max_candidates = max_candidates
        self.random_state = random_state

    def _cap(self):
        if self.selection not in DEFAULT_FPR_CAP:
            raise SafetyScopeError(f"unknown selection {self.selection!r}; use greedy or delta")
        return DEFAULT_FPR_CAP[self.selection] if self.fpr_cap == "auto" else self.fpr_cap

    def _select(self, X, y, k):
        """The first k features (in selection order) and their thresholds."""
        if self.selection == "greedy":
            return greedy_select(X, y, k, self.threshold, self._cap(), self.max_candidates)
        feats = rank_features(X, y, self.threshold)[0][:k]
        return feats, fpr_thresholds(X, y, feats, self.threshold, self._cap())

    def fit(self, X, y):
        X, y = _check_Xy(X, y)
        self._cap()  # validates selection before any work
        self.classes_ = np.array([0, 1])
        self.k_scores_ = {}
        if self.max_features is not None:
            if self.max_features < 1:
                raise SafetyScopeError("max_features must be >= 1")
            k = int(self.max_features)
            self.k_selection_ = "fixed"
        else:
            _check_enough_for_holdouts(y, "K")
            splits = StratifiedShuffleSplit(self.n_splits, test_size=self.holdout, random_state=self.random_state)
            scores = {int(k): [] for k in self.k_candidates}
            for idx_fit, idx_val in splits.split(np.zeros(len(y)), y):
                Xv, yv = X[idx_val], y[idx_val]
                # one selection of the largest K; its prefixes are the smaller rules (greedy and delta alike)
                feats, thr = self._select(X[idx_fit], y[idx_fit], max(self.k_candidates))
                for k in scores:
                    scores[k].append(f1_score(yv, _or_predict(Xv, feats[:k], thr[:k]), zero_division=0))
            self.k_scores_ = {k: float(np.mean(v)) for k, v in scores.items()}
            k = max(self.k_scores_, key=lambda kk: (self.k_scores_[kk], -kk))  # best F1, then fewer features
            self.k_selection_ = (f"mean F1 on {self.n_splits} stratified {self.holdout:.0%} hold-outs of the fitting "
                                 f"data (seed {self.random_state})")
        feats, thr = self._select(X, y, k)
        self.features_, self.thresholds_ = feats.astype(np.int64), thr
        # firing rates of each selected feature at its own threshold: what the rule does with it
        fires = X[:, self.features_].toarray() > thr[None, :]
        self.p_toxic_, self.p_clean_ = fires[y == 1].mean(axis=0), fires[y == 0].mean(axis=0)
        self.delta_ = self.p_toxic_ - self.p_clean_
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        """max over selected features of (activation - threshold): > 0 exactly when predicted toxic.
        With thresholds of 0 this is the max activation over the selected features."""
        X, _ = _check_Xy(X)
        out = np.empty(X.shape[0])
        for rows, sub in _dense_blocks(X, self.features_):
            out[rows] = (sub - self.thresholds_[None, :]).max(axis=1)
        return out

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features that fire."""
        X, _ = _check_Xy(X)
        out = []
        for _, sub in _dense_blocks(X, self.features_):
            out += [self.features_[row].tolist() for row in sub > self.thresholds_[None, :]]
        return out

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
        params.setdefault("selection", "delta")  # files written before greedy selection existed
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
    out = np.zeros(X.shape[0], dtype=int)
    for rows, sub in _dense_blocks(X, feats):
        out[rows] = (sub > thr[None, :]).any(axis=1)
    return out


class SparseLinearClassifier(ClassifierMixin, BaseEstimator):
    """L1 logistic regression on log1p of pooled SAE activations, keeping at most ``max_features`` weights.

    C is chosen by stratified cross-validation F1 among the values whose fit keeps at most
    ``max_features`` non-zero weights (``C`` fixes it instead).
    """

    def __init__(self, max_features: int = 128, C: float | None = None, cv: int = 3, min_df: int = 3,
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
            _check_enough_for_holdouts(y, "C")
            skf = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
            self.C_scores_ = {}
            for C in np.logspace(-2, 1, 13):
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
        sub = self._transform(X[:, self.features_])  # sparse: log1p(0) = 0 keeps it sparse
        return np.asarray(sub @ self.weights_).ravel() + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features with a positive weight that are active (push towards toxic)."""
        X, _ = _check_Xy(X)
        pos = self.weights_ > 0
        out = []
        for _, sub in _dense_blocks(X, self.features_):
            out += [self.features_[row & pos].tolist() for row in sub > 0]
        return out

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
