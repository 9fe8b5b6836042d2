"""Classifiers over pooled SAE codes (CSR, texts x d_sae), scikit-learn style.

- ``OrRuleClassifier``: the Qwen-Scope rule: a text is toxic if any of K selected features fires.
  ``selection="delta"`` is the report's selection: rank features by delta_f = P(fires | toxic) -
  P(fires | clean) and keep the top K. ``selection="greedy"`` (default, beyond the report) adds one
  (feature, threshold) pair at a time, the one that most raises the F1 of the OR on the fitting data:
  top-delta features fire on the same toxic texts, so the K-th adds little recall, while greedy picks
  features that catch what the earlier ones miss. Thresholds come from capping each feature's own
  firing rate on clean texts (``fpr_cap``).
  ``criterion`` says what selection and the choice of K optimise: ``"f1"`` (balanced F1 on the
  fitting data) or ``"recall_at_fpr"`` (the most toxic texts caught while the whole rule fires on at
  most ``target_fpr`` of clean texts: the operating point a user on real traffic, where toxic texts
  are a few per cent, picks a detector by).
- ``SparseLinearClassifier``: L1 logistic regression on log1p(activations) with few non-zero
  weights; still explainable feature by feature (contribution = weight * log1p(act)).

Both serialise to plain dicts (``to_dict``/``from_dict``) for the classifier JSON file.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ..errors import SafetyScopeError
from .config import Criterion, Selection

K_CANDIDATES = (1, 2, 5, 10)
# Clean firing rates greedy selection may give a single feature (those <= fpr_cap are tried).
RATE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_FPR_CAP = {"greedy": 0.2, "delta": 0.02}  # keys: the Selection values
CRITERIA = tuple(sorted(get_args(Criterion)))
# Fewest rows of each class a classifier is fitted on: 3 stratified hold-outs / CV folds need a few of each.
MIN_PER_CLASS = 5


def _check_Xy(X, y=None):
    """X as CSR (dense input as float32, as before validation existed), y as given; no estimator state."""
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X = X.tocsr()
    if y is None:
        return X, None
    y = np.asarray(y)
    if X.shape[0] != len(y):
        raise SafetyScopeError(f"{X.shape[0]} rows of features but {len(y)} labels")
    return X, y


def _n_rows(X) -> int | None:
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape):
        return int(shape[0])
    try:
        return len(X)
    except TypeError:
        return None


def _validate_fit(est, X, y):
    """Validated (CSR X, y encoded 0/1); sets ``classes_`` (any two labels; classes_[1] is the one rules detect)
    and ``n_features_in_``. Labels 0/1 (every file written so far) map to themselves."""
    n_x, n_y = _n_rows(X), _n_rows(y)
    if n_x is not None and n_y is not None and n_x != n_y:
        raise SafetyScopeError(f"{n_x} rows of features but {n_y} labels")
    X, y = validate_data(est, X, y, accept_sparse="csr", dtype="numeric")
    check_classification_targets(y)
    classes, y01 = np.unique(y, return_inverse=True)
    if len(classes) != 2:
        if len(classes) == 1:
            raise SafetyScopeError(f"fitting needs both toxic and clean examples; got one class ({classes[0]!r})")
        raise SafetyScopeError(f"Only binary classification is supported (toxic vs clean); got {len(classes)} classes")
    est.classes_ = classes
    return _check_Xy(X, y01)


def _binary_sparse_tags(tags):
    """scikit-learn tags of both rule kinds: sparse input welcome, exactly two classes."""
    tags.input_tags.sparse = True
    tags.classifier_tags.multi_class = False
    return tags


def _validate_predict(est, X):
    """CSR X with the fitted number of columns; NotFittedError before fit."""
    check_is_fitted(est, "features_")
    X = validate_data(est, X, accept_sparse="csr", dtype="numeric", reset=False)
    return _check_Xy(X)[0]


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


def best_layer(best_delta: dict[int, float]) -> int:
    """The layer scans' one choice (`discover --scan-layers`, `eval --scan-layers`): the layer whose best single
    feature has the largest delta (the report's criterion); ties go to the lower layer."""
    return max(best_delta, key=lambda layer: (best_delta[layer], -layer))


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


def _weighted_rate_threshold(scores: np.ndarray, weights: np.ndarray, rate: float) -> float:
    """The smallest threshold (one of ``scores``) whose firings (score > threshold) carry at most ``rate`` of the
    total weight. With unit weights this is _rate_thresholds' (floor(rate * n) + 1)-th largest score."""
    order = np.argsort(-scores, kind="stable")
    cum = np.cumsum(weights[order])
    # the first sorted position whose cumulative weight passes the budget: everything strictly above it fits
    j = int(np.searchsorted(cum, rate * cum[-1], side="right"))
    return float(scores[order[j]]) if j < len(order) else -np.inf


def group_splits(y: np.ndarray, groups, max_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) with every row of a group on one side: leave one group out (GroupKFold with
    ``max_folds`` folds beyond that many groups). Why: rows of one source share a style (tweets, templates,
    rewrites), so a hold-out drawn from the sources a rule was fitted on rewards that style; a held-out
    source measures what carries over to data nobody tuned on."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    groups = np.asarray(groups, dtype=object)
    if groups.shape != y.shape:
        raise SafetyScopeError(f"{len(y)} rows but {len(groups)} group labels")
    if any(g is None for g in groups):
        raise SafetyScopeError(f"{sum(g is None for g in groups)} row(s) have no group")
    groups = groups.astype(str)
    if len(set(groups.tolist())) < 2:
        raise SafetyScopeError(f"grouped selection needs at least 2 groups (e.g. sources); found only {str(groups[0])!r}")
    n = len(set(groups.tolist()))
    splitter = LeaveOneGroupOut() if n <= max_folds else GroupKFold(max_folds)
    out = [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, groups) if len(set(y[tr].tolist())) == 2]
    if not out:
        raise SafetyScopeError("no held-out group leaves both toxic and clean rows to fit on")
    return out


def by_group_rates(y: np.ndarray, fired: np.ndarray, groups) -> dict:
    """Per group: rows, recall on its toxic rows and firing rate on its clean rows (None where it has none)."""
    groups = np.asarray(groups, dtype=object).astype(str)
    out = {}
    for g in sorted(set(groups.tolist())):
        m = groups == g
        tox, clean = m & (y == 1), m & (y == 0)
        out[g] = {"toxic": int(tox.sum()), "clean": int(clean.sum()),
                  "recall": float(fired[tox].mean()) if tox.any() else None,
                  "fpr": float(fired[clean].mean()) if clean.any() else None}
    return out


def out_of_fold_operating_point(score_fold, y: np.ndarray, target_fpr: float, *, cv: int, seed: int, groups=None,
                                strata=None, measured=None, weights=None) -> tuple[float, np.ndarray, dict]:
    """The threshold at which out-of-fold scores flag at most ``target_fpr`` (a weighted share with ``weights``) of the
    ``measured`` rows (default: the clean rows): (threshold, which rows those scores flag, the file's record).
    ``score_fold(fit_rows, held_rows)`` scores the held rows with a rule fitted on the fit rows only. Folds: ``cv``
    stratified folds (on ``strata``, default ``y``), or held-out groups (``group_splits``) when ``groups`` is given.
    Out-of-fold, because in-sample scores of clean texts are optimistic: a threshold set on them fires more on new data."""
    if not 0 < float(target_fpr) < 1:
        raise SafetyScopeError(f"target_fpr must be in (0, 1), not {target_fpr}")
    _check_enough_for_holdouts(y, "the operating point")
    measured = (y == 0) if measured is None else measured
    if groups is None:
        splits = StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y if strata is None else strata)
        method = f"{cv}-fold out-of-fold scores of the fitting data"
    else:
        splits = group_splits(y, groups)
        method = (f"out-of-group scores ({len(set(np.asarray(groups).astype(str).tolist()))} groups, each scored by a "
                  "rule fitted without it)")
    oof = np.full(len(y), np.nan)
    for tr, te in splits:
        oof[te] = score_fold(tr, te)
    if np.isnan(oof).any():  # a group whose removal leaves one class: scored by no fold
        raise SafetyScopeError(f"{int(np.isnan(oof).sum())} rows are in a group that cannot be held out "
                               "(without it one class is left); merge it with another group")
    w = np.ones(len(y)) if weights is None else weights
    threshold = _weighted_rate_threshold(oof[measured], w[measured], float(target_fpr))
    fired = oof > threshold
    record = {"target_fpr": float(target_fpr), "threshold": threshold, "oof_recall": float(fired[y == 1].mean()),
              "oof_fpr": float(fired[measured].mean()), "method": method}
    if groups is not None:
        record["by_group"] = by_group_rates(y, fired, groups)
    return threshold, fired, record


def _shift_to_operating_point(rule, score_fold, y: np.ndarray, sw, fpr_rows, groups) -> None:
    """Set ``rule.operating_point_`` by ``out_of_fold_operating_point`` at ``rule.target_fpr`` and fold its threshold
    into ``rule.intercept_``, so predict stays score > 0. The one place the weighted rules (sparse linear, linear)
    record which rows the FPR was measured on and whether sample weights took part."""
    # with fpr_rows, every fold holds its share of them: a fold without any would leave no score to set on
    threshold, fired, rule.operating_point_ = out_of_fold_operating_point(
        score_fold, y, rule.target_fpr, cv=rule.cv, seed=rule.random_state, groups=groups,
        strata=None if fpr_rows is None else y + 2 * fpr_rows, measured=fpr_rows, weights=sw)
    rule.intercept_ -= threshold
    if fpr_rows is not None:  # which FPR oof_fpr is, and the one on all clean rows beside it
        rule.operating_point_.update({"fpr_rows": int(fpr_rows.sum()), "oof_fpr_all_clean": float(fired[y == 0].mean())})
    if sw is not None:
        rule.operating_point_["sample_weight"] = True


def _check_fpr_rows(fpr_rows, y: np.ndarray, target_fpr, cv: int) -> np.ndarray | None:
    """fpr_rows as a boolean row mask of clean rows, or None; named errors for anything else."""
    if fpr_rows is None:
        return None
    if target_fpr is None:
        raise SafetyScopeError("fpr_rows sets where the operating point's FPR is measured; it needs target_fpr")
    mask = np.asarray(fpr_rows)
    if mask.dtype != bool or mask.shape != y.shape:
        raise SafetyScopeError(f"fpr_rows must be a boolean mask of the {len(y)} rows; got dtype {mask.dtype}, "
                               f"shape {mask.shape}")
    if (mask & (y == 1)).any():
        raise SafetyScopeError(f"fpr_rows must mark clean rows only; {int((mask & (y == 1)).sum())} are toxic")
    if mask.sum() < max(MIN_PER_CLASS, cv):
        raise SafetyScopeError(f"fpr_rows marks {int(mask.sum())} rows; the operating point needs at least "
                               f"{max(MIN_PER_CLASS, cv)}")
    return mask


def _rows(sw: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if sw is None else sw[idx]


def greedy_select(X, y, k: int, base: float, fpr_cap: float | None, max_candidates: int = 256,
                  target_fpr: float | None = None):
    """Forward selection of (feature, threshold) pairs for an OR-rule, best criterion on (X, y) at each step.

    Candidates: the ``max_candidates`` features of highest delta (bounded memory: one dense
    rows x candidates block), each at the thresholds capping its clean firing rate at every rate of
    RATE_GRID up to ``fpr_cap`` (None: also the base threshold). Returns feature ids and thresholds in
    the order they were added, so the first k' of them are the greedy rule of size k'.
    ``target_fpr`` None: each step maximises the F1 of the OR. Otherwise each step maximises the OR's
    recall among the pairs that keep its clean firing rate <= target_fpr (ties: fewer clean firings);
    selection stops early when no pair adds a toxic text within that budget.
    """
    order, _, _, _ = rank_features(X, y, base)
    cols = order[:max_candidates]
    A = X[:, cols].toarray()
    toxic = y == 1
    rates = [r for r in RATE_GRID if fpr_cap is None or r <= fpr_cap] + ([1.0] if fpr_cap is None else [])
    if target_fpr is not None and fpr_cap is not None and fpr_cap not in rates:
        rates.append(fpr_cap)  # the budget itself is a candidate rate for a single feature
    thr_grid = np.stack([_rate_thresholds(A[~toxic], base, r) for r in rates])  # rates x candidates
    n_clean = int((~toxic).sum())
    clean_budget = None if target_fpr is None else int(np.floor(target_fpr * n_clean))
    covered = np.zeros(len(y), dtype=bool)
    feats, thrs = [], []
    for _ in range(min(k, len(cols))):
        best = (-np.inf, 0, 0)
        used = np.isin(cols, feats)  # each feature once
        for g, thr in enumerate(thr_grid):
            fires = (A > thr[None, :]) | covered[:, None]
            tp = fires[toxic].sum(axis=0)
            fp = fires[~toxic].sum(axis=0)
            if clean_budget is None:
                score = 2 * tp / np.maximum(2 * tp + fp + (toxic.sum() - tp), 1)
            else:  # recall within the clean budget; a clean firing costs less than one toxic text
                score = np.where(fp <= clean_budget, tp - fp / (n_clean + 1.0), -np.inf)
            score = np.where(used, -np.inf, score)
            j = int(np.argmax(score))  # ties: the higher-delta feature
            if score[j] > best[0]:
                best = (float(score[j]), g, j)
        score, g, j = best
        if clean_budget is not None:
            gained = (A[toxic, j] > thr_grid[g, j]) & ~covered[toxic]
            if not np.isfinite(score) or not gained.any():
                break  # nothing more to catch within the clean budget
        feats.append(int(cols[j]))
        thrs.append(float(thr_grid[g, j]))
        covered |= A[:, j] > thr_grid[g, j]
    return np.array(feats, dtype=np.int64), np.array(thrs, dtype=np.float64)


def _fold_metrics(y, pred) -> dict:
    """Recall, clean firing rate (FPR) and F1 of predictions on one hold-out."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(bool)
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    return {"recall": tp / max(int((y == 1).sum()), 1), "fpr": fp / max(int((y == 0).sum()), 1),
            "f1": float(f1_score(y, pred.astype(int), zero_division=0))}


class _ScoreRule:
    """What every rule derives from its ``decision_function`` (> 0 exactly when the rule flags a text)."""

    def predict(self, X) -> np.ndarray:
        """classes_[1] where decision_function > 0, else classes_[0] (0/1 for every rule fitted on 0/1 labels)."""
        fires = self.decision_function(X) > 0  # checks fitted first
        return self.classes_[fires.astype(int)]


class _LogisticScoreRule(_ScoreRule):
    """A rule whose score is a logistic regression's log-odds (threshold folded into the intercept)."""

    def predict_proba(self, X) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)


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
            folds = {int(k): [] for k in self.k_candidates}
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

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features that fire."""
        X = _validate_predict(self, X)
        out = []
        for _, sub in _dense_blocks(X, self.features_):
            out += [self.features_[row].tolist() for row in sub > self.thresholds_[None, :]]
        return out

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
        clf = _construct(cls, params)
        clf.classes_ = _read_classes(d)
        clf.features_, clf.thresholds_ = f["id"], f["threshold"]
        clf.delta_, clf.p_toxic_, clf.p_clean_ = f["delta"], f["p_fire_toxic"], f["p_fire_clean"]
        clf.n_features_in_ = n
        clf.k_selection_, clf.k_scores_ = d.get("k_selection", ""), {int(k): v for k, v in d.get("k_scores", {}).items()}
        clf.k_folds_ = {int(k): v for k, v in d.get("k_folds", {}).items()}
        clf.holdout_ = d.get("holdout", [])
        return clf


def _number(v, key: str, *, integer: bool = False):
    """A finite JSON number (an integer where ``integer``; 161.0 counts, 161.9 does not); else a named error."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if ok and integer and float(v) != int(v):
        ok = False
    if not ok:
        raise SafetyScopeError(f"classifier {key} must be a finite {'integer' if integer else 'number'}; got {v!r}")
    return int(v) if integer else float(v)


def _read_features(d: dict, fields: tuple[str, ...]) -> tuple[int, dict[str, np.ndarray]]:
    """(n_features_in, {"id": ids, field: values}) from a rule dict, every key checked: a malformed id would
    index another feature (-1 wraps to the last), a NaN threshold silently never fires."""
    for key, kind in (("n_features_in", int), ("features", list), ("params", dict)):
        if key not in d:
            raise SafetyScopeError(f"classifier rule is missing key {key!r}")
        if not isinstance(d[key], kind) or isinstance(d[key], bool):
            raise SafetyScopeError(f"classifier rule key {key!r} must be a {kind.__name__}; got {d[key]!r:.80}")
    n = _number(d["n_features_in"], "n_features_in", integer=True)
    if n < 1:
        raise SafetyScopeError(f"classifier n_features_in must be positive; got {n}")
    cols = {name: [] for name in ("id", *fields)}
    for i, f in enumerate(d["features"]):
        if not isinstance(f, dict):
            raise SafetyScopeError(f"classifier features[{i}] must be an object; got {f!r:.80}")
        for name in cols:
            if name not in f:
                raise SafetyScopeError(f"classifier features[{i}] is missing key {name!r}")
            cols[name].append(_number(f[name], f"features[{i}].{name}", integer=name == "id"))
        if not 0 <= cols["id"][-1] < n:
            raise SafetyScopeError(f"classifier features[{i}].id {cols['id'][-1]} is out of range 0..{n - 1}")
    return n, {"id": np.array(cols["id"], dtype=np.int64),
               **{name: np.array(cols[name], dtype=np.float64) for name in fields}}


def _write_classes(clf, out: dict) -> None:
    """Labels other than 0/1 go into the file as "classes"; 0/1 rules (every file so far) are written as before."""
    classes = clf.classes_.tolist()
    if classes != [0, 1]:
        out["classes"] = classes


def _read_classes(d: dict) -> np.ndarray:
    classes = d.get("classes", [0, 1])
    if not isinstance(classes, list) or len(classes) != 2 or classes[0] == classes[1]:
        raise SafetyScopeError(f"classifier classes must be a list of two different labels; got {classes!r:.80}")
    return np.array(classes)


def _construct(cls, params: dict):
    try:
        return cls(**params)
    except TypeError as e:  # an unknown or missing parameter name
        raise SafetyScopeError(f"classifier params do not fit {cls.__name__} ({e})") from None


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

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features with a positive weight that are active (push towards toxic)."""
        X = _validate_predict(self, X)
        pos = self.weights_ > 0
        out = []
        for _, sub in _dense_blocks(X, self.features_):
            out += [self.features_[row & pos].tolist() for row in sub > 0]
        return out

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
        clf = _construct(cls, d["params"])
        clf.classes_ = _read_classes(d)
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


def rule_inputs(rule, codes, mean_acts=None):
    """The matrix a rule reads: SAE codes, or ``hstack([codes, mean_acts])`` for a rule that ``reads`` both."""
    if getattr(rule, "reads", "codes") != "codes+mean":
        return codes
    if mean_acts is None:
        raise SafetyScopeError("this classifier reads the mean residual beside the SAE codes; none was given")
    return sp.hstack([sp.csr_matrix(codes), sp.csr_matrix(np.asarray(mean_acts, dtype=np.float32))], format="csr")


KINDS = {"or_rule": OrRuleClassifier, "sparse_linear": SparseLinearClassifier, "linear": LinearProbeClassifier}


def classifier_from_dict(d: dict):
    if not isinstance(d, dict):
        raise SafetyScopeError(f"classifier rule must be an object; got {type(d).__name__}")
    if d.get("kind") not in KINDS:
        raise SafetyScopeError(f"unknown classifier kind {d.get('kind')!r}; expected one of {sorted(KINDS)}")
    rule = KINDS[d["kind"]].from_dict(d)
    # a rule whose score cannot depend on the text flags every text or none: a broken file, not a classifier
    weights = getattr(rule, "weights_", None)
    if len(rule.features_) == 0 if weights is None or d["kind"] != "linear" else not np.any(weights):
        raise SafetyScopeError(f"classifier rule ({d['kind']}) has no features with a weight, so it would flag "
                               "every text or none; refit it with discover")
    return rule
