"""Feature ranking, the greedy OR-rule search, per-feature thresholds, held-out splits (stratified or by group) and the
out-of-fold operating point the weighted rules set their threshold by."""

from __future__ import annotations

from typing import get_args

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from ...errors import SafetyScopeError
from ..config import Criterion
from .base import MIN_PER_CLASS, _check_enough_for_holdouts

K_CANDIDATES = (1, 2, 5, 10)
# Clean firing rates greedy selection may give a single feature (those <= fpr_cap are tried).
RATE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_FPR_CAP = {"greedy": 0.2, "delta": 0.02}  # keys: the Selection values
CRITERIA = tuple(sorted(get_args(Criterion)))


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


def out_of_fold_scores(score_fold, y: np.ndarray, *, cv: int, seed: int, groups=None, strata=None):
    """(every row's score by a rule fitted without its fold, how the folds were made). ``score_fold(fit_rows,
    held_rows)`` scores the held rows; folds: ``cv`` stratified folds (on ``strata``, default ``y``), or held-out
    groups (``group_splits``) when ``groups`` is given."""
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
    return oof, method


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
    oof, method = out_of_fold_scores(score_fold, y, cv=cv, seed=seed, groups=groups, strata=strata)
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
    feats: list[int] = []
    thrs: list[float] = []
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

