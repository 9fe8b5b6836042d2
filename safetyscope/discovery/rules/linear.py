"""The weighted rules: L1 logistic regression on a few SAE features (``SparseLinearClassifier``) and the L2 probe on
every SAE feature plus the mean residual (``LinearProbeClassifier``)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import _check_sample_weight

from ...errors import SafetyScopeError
from .base import (
    _binary_sparse_tags,
    _check_enough_for_holdouts,
    _construct,
    _LogisticScoreRule,
    _number,
    _read_classes,
    _read_features,
    _rows,
    _validate_fit,
    _validate_predict,
    _write_classes,
)
from .selection import _check_fpr_rows, _shift_to_operating_point, group_splits


class SparseLinearClassifier(_LogisticScoreRule, ClassifierMixin, BaseEstimator):
    """L1 logistic regression on log1p of pooled SAE activations, keeping at most ``max_features`` weights.

    C is chosen by stratified cross-validation F1 among the values whose fit keeps at most
    ``max_features`` non-zero weights (``C`` fixes it instead).

    ``target_fpr`` None: the operating point is the logistic one (score > 0, what F1 on balanced data
    favours). A rate R: the score threshold is set so that at most R of the clean fitting texts are
    flagged by *out-of-fold* scores (the ``cv`` folds, each scored by a rule fitted without it), and
    folded into ``intercept_`` so that ``predict`` is still score > 0. Out-of-fold, because in-sample
    scores of clean texts are optimistic: a threshold set on them fires more on new data.

    ``fit(X, y, sample_weight, fpr_rows)``: ``sample_weight`` weighs rows in every logistic fit (C search,
    final fit, out-of-fold fits), in the CV F1 that picks C, and in the operating point's rate (a weighted
    share of rows). ``fpr_rows``, a boolean mask of clean rows, measures the operating point's FPR on those
    rows only instead of on all clean rows: e.g. harmless prompts that look harmful, when the false positives
    that matter are the ones on them (its out-of-fold folds are then stratified on it too).
    """

    def __init__(self, max_features: int = 128, C: float | None = None, cv: int = 3, min_df: int = 3,
                 random_state: int = 0, target_fpr: float | None = None):
        self.max_features = max_features
        self.C = C
        self.cv = cv
        self.min_df = min_df
        self.random_state = random_state
        self.target_fpr = target_fpr

    def __sklearn_tags__(self):
        return _binary_sparse_tags(super().__sklearn_tags__())

    @staticmethod
    def _transform(X):
        X = X.copy()
        X.data = np.log1p(np.maximum(X.data, 0))
        return X

    def _lr(self, C):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=self.random_state)

    def fit(self, X, y, sample_weight=None, fpr_rows=None, groups=None):
        """``groups`` (e.g. each row's source): C is chosen and the operating point set on held-out groups
        (``group_splits``: a group's rows are scored by a rule fitted without any of them) instead of stratified
        folds, and ``operating_point_["by_group"]`` records each held-out group's recall and clean firing rate."""
        X, y = _validate_fit(self, X, y)
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, X, dtype=np.float64)
        fpr_rows = _check_fpr_rows(fpr_rows, y, self.target_fpr, self.cv)
        Xt = self._transform(X)
        df = np.asarray((X > 0).sum(axis=0)).ravel()
        cols = np.flatnonzero(df >= self.min_df)  # features that almost never fire carry no signal
        Xc = Xt[:, cols]
        if self.C is not None:
            C = float(self.C)
            self.C_scores_ = {}
        else:
            _check_enough_for_holdouts(y, "C")
            splits = (list(StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state).split(Xc, y))
                      if groups is None else group_splits(y, groups))
            self.C_scores_ = {}
            for C in np.logspace(-2, 1, 13):
                nnz = np.count_nonzero(self._lr(C).fit(Xc, y, sample_weight=sw).coef_)
                if nnz > self.max_features or nnz == 0:
                    continue
                if groups is None:
                    f1s = [f1_score(y[te], self._lr(C).fit(Xc[tr], y[tr], sample_weight=_rows(sw, tr)).predict(Xc[te]),
                                    sample_weight=_rows(sw, te), zero_division=0) for tr, te in splits]
                else:  # a held-out group may hold one class only: F1 of the pooled out-of-group predictions
                    pred = np.zeros(len(y), dtype=int)
                    for tr, te in splits:
                        pred[te] = self._lr(C).fit(Xc[tr], y[tr], sample_weight=_rows(sw, tr)).predict(Xc[te])
                    f1s = [f1_score(y, pred, sample_weight=sw, zero_division=0)]
                self.C_scores_[float(C)] = float(np.mean(f1s))
            if not self.C_scores_:
                C = 0.01
            else:
                C = max(self.C_scores_, key=lambda c: (self.C_scores_[c], -c))
        lr = self._lr(C).fit(Xc, y, sample_weight=sw)
        coef = lr.coef_.ravel()
        keep = np.flatnonzero(coef)
        keep = keep[np.argsort(-np.abs(coef[keep]))][: self.max_features]
        self.C_ = C
        self.features_ = cols[keep].astype(np.int64)
        self.weights_ = coef[keep].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        self.operating_point_ = {}
        if self.target_fpr is not None:
            self._set_operating_point(Xc, y, C, sw, fpr_rows, groups)
        return self

    def _set_operating_point(self, Xc, y: np.ndarray, C: float, sw=None, fpr_rows=None, groups=None) -> None:
        """Shift the intercept so that out-of-fold scores exceed 0 on at most target_fpr (a weighted share with
        sample weights) of the clean rows, or of ``fpr_rows`` when given; with ``groups``, out-of-group scores."""
        def score_fold(tr, te):
            return self._lr(C).fit(Xc[tr], y[tr], sample_weight=_rows(sw, tr)).decision_function(Xc[te])

        _shift_to_operating_point(self, score_fold, y, sw, fpr_rows, groups)

    def decision_function(self, X) -> np.ndarray:
        X = _validate_predict(self, X)
        sub = self._transform(X[:, self.features_])  # sparse: log1p(0) = 0 keeps it sparse
        return np.asarray(sub @ self.weights_).ravel() + self.intercept_

    def _fires(self, sub: np.ndarray) -> np.ndarray:
        """The selected features with a positive weight that are active (push towards toxic)."""
        return (sub > 0) & (self.weights_ > 0)[None, :]

    def to_dict(self) -> dict:
        feats = [{"id": int(f), "weight": float(w)} for f, w in zip(self.features_, self.weights_)]
        out = {"kind": "sparse_linear", "params": self.get_params(), "features": feats, "intercept": self.intercept_,
               "C": self.C_, "C_scores": self.C_scores_, "n_features_in": self.n_features_in_, "k": len(feats),
               "k_selection": f"L1 path, C by {self.cv}-fold CV F1 with <= {self.max_features} non-zero weights",
               **({"operating_point": self.operating_point_} if self.operating_point_ else {})}
        _write_classes(self, out)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SparseLinearClassifier":
        n, f = _read_features(d, ("weight",))
        for key in ("intercept", "C"):
            if key not in d:
                raise SafetyScopeError(f"classifier rule is missing key {key!r}")
        clf = cls._from_params(d, d["params"])
        clf.features_, clf.weights_ = f["id"], f["weight"]
        clf.intercept_, clf.C_ = _number(d["intercept"], "intercept"), _number(d["C"], "C")
        clf.C_scores_ = d.get("C_scores", {})
        clf.operating_point_ = d.get("operating_point", {})
        clf.n_features_in_ = n
        return clf


class LinearProbeClassifier(_LogisticScoreRule, ClassifierMixin, BaseEstimator):
    """L2 logistic regression on every SAE feature (log1p of its pooled activation) *and* the mean-pooled residual
    of the same layer (standardised), read from one matrix ``hstack([codes, mean_acts])`` (``reads``).

    Why both: max-pooled SAE codes carry the lexical evidence (a slur or a swear word fires a feature at one
    token), while the mean residual carries what a whole sentence says; on statements without profanity (implicit
    hate) the codes alone transfer worst (README: "Classifiers that generalize"). L2 rather than L1: a few
    features fitted to the training sources' words were what failed out of source.

    ``n_codes``: how many leading columns are SAE codes (the SAE's d_sae); the rest are the residual's d_model.
    ``target_fpr``: as SparseLinearClassifier, the threshold at that share of clean rows flagged by out-of-fold
    (with ``groups`` in ``fit``: out-of-group) scores, folded into ``intercept_``. The standardisation is folded
    into the weights, so the file holds one weight per column and an intercept. ``fired`` lists the active SAE
    features that push towards toxic, the largest contributions first (at most ``max_fired``).
    """

    reads = "codes+mean"

    def __init__(self, n_codes: int = 0, C: float = 0.01, target_fpr: float | None = None, cv: int = 3,
                 random_state: int = 0, max_fired: int = 10):
        self.n_codes = n_codes
        self.C = C
        self.target_fpr = target_fpr
        self.cv = cv
        self.random_state = random_state
        self.max_fired = max_fired

    def __sklearn_tags__(self):
        return _binary_sparse_tags(super().__sklearn_tags__())

    def _design(self, X) -> np.ndarray:
        """Dense design matrix: log1p(codes) beside the raw residual columns (not yet standardised)."""
        X = X.tocsr()
        codes = X[:, : self.n_codes].copy()
        codes.data = np.log1p(np.maximum(codes.data, 0))
        return np.hstack([codes.toarray(), X[:, self.n_codes:].toarray()]).astype(np.float64)

    def _lr(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=3000, random_state=self.random_state)

    def _fit_scaled(self, D: np.ndarray, y: np.ndarray, sw: np.ndarray | None = None):
        """(weights, intercept) on the unscaled design D: the residual columns standardised inside the fit."""
        mu, sd = np.zeros(D.shape[1]), np.ones(D.shape[1])
        raw = slice(self.n_codes, None)
        w = np.ones(len(D)) if sw is None else sw  # weighted, so weight 2 is the same fit as a row given twice
        mu[raw] = np.average(D[:, raw], axis=0, weights=w)
        sd[raw] = np.sqrt(np.average((D[:, raw] - mu[raw]) ** 2, axis=0, weights=w)) + 1e-6
        lr = self._lr().fit((D - mu) / sd, y, sample_weight=sw)
        w = lr.coef_.ravel() / sd
        return w, float(lr.intercept_[0] - (w * mu).sum())

    def fit(self, X, y, sample_weight=None, fpr_rows=None, groups=None):
        """``sample_weight``: per-row weights of the fit (e.g. hard negatives weigh more); ``fpr_rows``: the clean
        rows on which the operating point's FPR is measured (default: all clean rows), as in SparseLinearClassifier."""
        X, y = _validate_fit(self, X, y)
        if not 0 <= self.n_codes <= X.shape[1]:
            raise SafetyScopeError(f"n_codes {self.n_codes} is not within the {X.shape[1]} input columns")
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, X, dtype=np.float64)
        fpr_rows = _check_fpr_rows(fpr_rows, y, self.target_fpr, self.cv)
        D = self._design(X)
        self.weights_, self.intercept_ = self._fit_scaled(D, y, sw)
        self.operating_point_ = {}
        if self.target_fpr is not None:
            def score_fold(tr, te):
                w, b = self._fit_scaled(D[tr], y[tr], _rows(sw, tr))
                return D[te] @ w + b

            _shift_to_operating_point(self, score_fold, y, sw, fpr_rows, groups)
        # the features worth naming: SAE features with a positive weight (the residual columns have no name)
        self.features_ = np.flatnonzero(self.weights_[: self.n_codes] > 0).astype(np.int64)
        return self

    def decision_function(self, X) -> np.ndarray:
        X = _validate_predict(self, X)
        return self._design(X) @ self.weights_ + self.intercept_

    def fired(self, X) -> list[list[int]]:
        """Per row, the active SAE features that push towards toxic, largest contribution first."""
        X = _validate_predict(self, X)
        codes = X[:, : self.n_codes].tocsr()
        out = []
        for i in range(codes.shape[0]):
            row = codes[i]
            contrib = np.log1p(np.maximum(row.data, 0)) * self.weights_[row.indices]
            order = np.argsort(-contrib)
            out.append([int(row.indices[j]) for j in order[: self.max_fired] if contrib[j] > 0])
        return out

    def to_dict(self) -> dict:
        out = {"kind": "linear", "params": self.get_params(), "reads": self.reads,
               "weights": [float(w) for w in self.weights_], "intercept": self.intercept_,
               "n_features_in": self.n_features_in_, "k": int(len(self.features_)),
               "k_selection": "every SAE feature and the mean residual, L2 logistic regression",
               **({"operating_point": self.operating_point_} if self.operating_point_ else {})}
        _write_classes(self, out)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LinearProbeClassifier":
        for key in ("weights", "intercept", "n_features_in", "params"):
            if key not in d:
                raise SafetyScopeError(f"classifier rule is missing key {key!r}")
        w = np.asarray(d["weights"], dtype=np.float64)
        n = int(_number(d["n_features_in"], "n_features_in", integer=True))
        if w.ndim != 1 or len(w) != n or not np.isfinite(w).all():
            raise SafetyScopeError(f"classifier weights must be {n} finite numbers; got {w.shape}")
        clf = _construct(cls, d["params"])
        if not 0 <= clf.n_codes <= n:
            raise SafetyScopeError(f"classifier n_codes {clf.n_codes} is not within n_features_in {n}")
        clf.classes_ = _read_classes(d)
        clf.weights_, clf.intercept_ = w, _number(d["intercept"], "intercept")
        clf.n_features_in_ = n
        clf.features_ = np.flatnonzero(w[: clf.n_codes] > 0).astype(np.int64)
        clf.operating_point_ = d.get("operating_point", {})
        return clf

