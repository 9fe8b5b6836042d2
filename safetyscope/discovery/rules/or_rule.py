"""The OR-rule (toxic if any selected feature fires above its threshold) and its random-feature control."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedShuffleSplit

from ...errors import SafetyScopeError
from ..config import Criterion, Selection
from .base import (
    _binary_sparse_tags,
    _check_enough_for_holdouts,
    _dense_blocks,
    _read_features,
    _ScoreRule,
    _validate_fit,
    _validate_predict,
    _write_classes,
)
from .selection import (
    CRITERIA,
    DEFAULT_FPR_CAP,
    K_CANDIDATES,
    _fold_metrics,
    _rate_thresholds,
    fpr_thresholds,
    greedy_select,
    group_splits,
    rank_features,
)


class OrRuleClassifier(_ScoreRule, ClassifierMixin, BaseEstimator):
    """Toxic if any selected feature's pooled activation exceeds its threshold.

    Parameters
    ----------
    max_features : int or None
        K. None chooses K from ``k_candidates`` on held-back parts of the fitting data, by ``criterion``.
    criterion : "f1" or "recall_at_fpr"
        "f1": selection and K maximise F1. "recall_at_fpr": they maximise recall while the rule's clean
        firing rate stays <= ``target_fpr`` (greedy: on the fitting rows at every step; K: the largest
        mean hold-out recall among the K whose mean hold-out clean firing rate is <= target_fpr).
    target_fpr : float
        The clean firing rate budget of "recall_at_fpr" (ignored by "f1").
    selection : "greedy" or "delta"
        How the K features are picked (module docstring); "delta" is the Qwen-Scope report's ranking.
    threshold : float
        Base firing threshold (the report uses 0).
    fpr_cap : float, None or "auto"
        Largest share of clean texts one selected feature may fire on; its threshold is raised until it
        does not fire on more. "delta" uses exactly this cap; "greedy" tries the rates of RATE_GRID up to
        it. None: no cap (for "delta", threshold = ``threshold`` for all: the report's rule).
        "auto": 0.2 for greedy, 0.02 for delta; with "recall_at_fpr", target_fpr for both.
    holdout : float
        Share held back for choosing K.
    n_splits : int
        K is chosen by the mean hold-out F1 over this many seeded stratified splits: one small hold-out
        is noisy enough to pick a K whose extra features only fit the sample. The recall, FPR and F1 of
        every K on every hold-out are kept in ``k_folds_`` (and the classifier file).
    """

    def __init__(self, max_features: int | None = None, selection: Selection = "greedy", threshold: float = 0.0,
                 fpr_cap: float | None | str = "auto", k_candidates: tuple[int, ...] = K_CANDIDATES,
                 holdout: float = 0.25, n_splits: int = 3, max_candidates: int = 256, random_state: int = 0,
                 criterion: Criterion = "f1", target_fpr: float = 0.02):
        # criterion defaults to "f1" here so that files written before it existed keep their meaning;
        # `discover` defaults to recall_at_fpr (README: Operating points)
        self.max_features = max_features
        self.criterion = criterion
        self.target_fpr = target_fpr
        self.selection = selection
        self.threshold = threshold
        self.fpr_cap = fpr_cap
        self.k_candidates = k_candidates
        self.holdout = holdout
        self.n_splits = n_splits
        self.max_candidates = max_candidates
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = _binary_sparse_tags(super().__sklearn_tags__())
        # each feature's clean firing rate is capped (fpr_cap): few false alarms bought with recall, so accuracy
        # on scikit-learn's balanced blob data stays below its 0.83 bar (0.66 for the default rule)
        tags.classifier_tags.poor_score = True
        return tags

    def _cap(self):
        if self.selection not in DEFAULT_FPR_CAP:
            raise SafetyScopeError(f"unknown selection {self.selection!r}; use greedy or delta")
        if self.criterion not in CRITERIA:
            raise SafetyScopeError(f"unknown criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}")
        if self.criterion == "recall_at_fpr" and not 0 < float(self.target_fpr) < 1:
            raise SafetyScopeError(f"target_fpr must be in (0, 1), not {self.target_fpr}")
        if self.fpr_cap == "auto":
            return float(self.target_fpr) if self.criterion == "recall_at_fpr" else DEFAULT_FPR_CAP[self.selection]
        return self.fpr_cap

    def _target(self) -> float | None:
        return float(self.target_fpr) if self.criterion == "recall_at_fpr" else None

    def _select(self, X, y, k):
        """The first k features (in selection order) and their thresholds."""
        if self.selection == "greedy":
            return greedy_select(X, y, k, self.threshold, self._cap(), self.max_candidates, self._target())
        feats = rank_features(X, y, self.threshold)[0][:k]
        return feats, fpr_thresholds(X, y, feats, self.threshold, self._cap())

    def fit(self, X, y, groups=None):
        """``groups`` (e.g. each row's source): K is chosen on held-out groups (``group_splits``) instead of
        stratified hold-outs of the pooled rows."""
        X, y = _validate_fit(self, X, y)
        return self._fit(X, y, groups)

    def _fit(self, X: sp.csr_matrix, y: np.ndarray, groups=None):
        """Fit on validated CSR X and labels encoded 0/1 (1: classes_[1], the class the rule detects)."""
        self._cap()  # validates selection before any work
        self.k_scores_, self.k_folds_ = {}, {}
        if self.max_features is not None:
            if self.max_features < 1:
                raise SafetyScopeError("max_features must be >= 1")
            k = int(self.max_features)
            self.k_selection_ = "fixed"
        else:
            _check_enough_for_holdouts(y, "K")
            if groups is None:
                splits = list(StratifiedShuffleSplit(self.n_splits, test_size=self.holdout,
                                                     random_state=self.random_state).split(np.zeros(len(y)), y))
                holdouts = f"{self.n_splits} stratified {self.holdout:.0%} hold-outs of the fitting data (seed {self.random_state})"
            else:
                splits = group_splits(y, groups)
                holdouts = f"{len(splits)} held-out groups"
            folds: dict[int, list[dict]] = {int(k): [] for k in self.k_candidates}
            for idx_fit, idx_val in splits:
                Xv, yv = X[idx_val], y[idx_val]
                # one selection of the largest K; its prefixes are the smaller rules (greedy and delta alike)
                feats, thr = self._select(X[idx_fit], y[idx_fit], max(self.k_candidates))
                for k in folds:
                    folds[k].append(_fold_metrics(yv, _or_predict(Xv, feats[:k], thr[:k])))
            self.k_folds_ = folds
            mean = {k: {m: float(np.mean([f[m] for f in v])) for m in ("recall", "fpr", "f1")} for k, v in folds.items()}
            if self.criterion == "f1":
                self.k_scores_ = {k: v["f1"] for k, v in mean.items()}
                k = max(self.k_scores_, key=lambda kk: (self.k_scores_[kk], -kk))  # best F1, then fewer features
                self.k_selection_ = f"mean F1 on {holdouts}"
            else:
                self.k_scores_ = {k: v["recall"] for k, v in mean.items()}
                within = [kk for kk in mean if mean[kk]["fpr"] <= self.target_fpr]
                if within:  # most recall within the budget, then fewer features
                    k = max(within, key=lambda kk: (mean[kk]["recall"], -kk))
                else:  # no K keeps the budget on held-out rows: the one closest to it
                    k = min(mean, key=lambda kk: (mean[kk]["fpr"], kk))
                self.k_selection_ = (f"mean recall among K with mean clean FPR <= {self.target_fpr:g} on {holdouts}"
                                     + ("" if within else "; no K met the FPR budget, K with the lowest FPR taken"))
        # what the chosen K did on each hold-out (recall, clean FPR, F1); the final rule may have fewer
        # features than K when recall_at_fpr selection stopped early
        self.holdout_ = self.k_folds_.get(k, [])
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
        X = _validate_predict(self, X)
        if not len(self.features_):  # an OR of no features never fires
            return np.full(X.shape[0], -np.inf)
        out = np.empty(X.shape[0])
        for rows, sub in _dense_blocks(X, self.features_):
            out[rows] = (sub - self.thresholds_[None, :]).max(axis=1)
        return out

    def _fires(self, sub: np.ndarray) -> np.ndarray:
        """The selected features that fire."""
        return sub > self.thresholds_[None, :]

    def to_dict(self) -> dict:
        feats = [{"id": int(f), "threshold": float(t), "delta": float(d), "p_fire_toxic": float(pt),
                  "p_fire_clean": float(pc)}
                 for f, t, d, pt, pc in zip(self.features_, self.thresholds_, self.delta_, self.p_toxic_, self.p_clean_)]
        out = {"kind": "or_rule", "params": self.get_params(), "features": feats, "n_features_in": self.n_features_in_,
               "k": len(feats), "k_selection": self.k_selection_, "k_scores": self.k_scores_}
        _write_classes(self, out)
        if self.k_folds_:
            out["k_folds"] = self.k_folds_
            out["holdout"] = self.holdout_
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "OrRuleClassifier":
        n, f = _read_features(d, ("threshold", "delta", "p_fire_toxic", "p_fire_clean"))
        params = dict(d["params"])
        params["k_candidates"] = tuple(params.get("k_candidates", K_CANDIDATES))
        params.setdefault("selection", "delta")  # files written before greedy selection existed
        clf = cls._from_params(d, params)
        clf.features_, clf.thresholds_ = f["id"], f["threshold"]
        clf.delta_, clf.p_toxic_, clf.p_clean_ = f["delta"], f["p_fire_toxic"], f["p_fire_clean"]
        clf.n_features_in_ = n
        clf.k_selection_, clf.k_scores_ = d.get("k_selection", ""), {int(k): v for k, v in d.get("k_scores", {}).items()}
        clf.k_folds_ = {int(k): v for k, v in d.get("k_folds", {}).items()}
        clf.holdout_ = d.get("holdout", [])
        return clf



class RandomMatchedOrRule(OrRuleClassifier):
    """Control: the fitted OR-rule's K, with each selected feature swapped for a random one (seeded) thresholded
    to fire on the same share of clean fitting texts. If this matches the real rule, the selection did no work."""

    def _fit(self, X, y, groups=None):
        super()._fit(X, y, groups)
        rng = np.random.default_rng(self.random_state)
        clean = X[y == 0]
        ever = np.flatnonzero(np.asarray((clean > self.threshold).sum(axis=0)).ravel() > 0)
        pool = np.setdiff1d(ever, self.features_)
        feats = rng.choice(pool, size=min(len(self.features_), len(pool)), replace=False).astype(np.int64)
        # each stand-in fires on at most the clean share its counterpart fired on (at least one text's worth)
        rates = np.maximum(self.p_clean_[: len(feats)], 1.0 / max(clean.shape[0], 1))
        thr = np.array([_rate_thresholds(clean[:, [f]].toarray(), self.threshold, r)[0] for f, r in zip(feats, rates)])
        self.features_, self.thresholds_ = feats, thr
        fires = X[:, feats].toarray() > thr[None, :]
        self.p_toxic_, self.p_clean_ = fires[y == 1].mean(axis=0), fires[y == 0].mean(axis=0)
        self.delta_ = self.p_toxic_ - self.p_clean_
        self.k_selection_ = "random features matched to the fitted rule's clean firing rates (control)"
        return self


def _or_predict(X, feats, thr) -> np.ndarray:
    out = np.zeros(X.shape[0], dtype=int)
    for rows, sub in _dense_blocks(X, feats):
        out[rows] = (sub > thr[None, :]).any(axis=1)
    return out

