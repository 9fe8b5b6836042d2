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

Modules: ``base`` (validation, the shared ``_ScoreRule`` base, file field readers), ``selection`` (ranking, greedy
search, hold-outs, operating points), ``or_rule``, ``linear`` (sparse linear and linear probe), ``serialise``
(``classifier_from_dict``). Every name is importable from here, as it was from the one ``rules.py``.
"""

from .base import DENSE_BLOCK, MIN_PER_CLASS, rule_inputs
from .base import _binary_sparse_tags as _binary_sparse_tags
from .base import _check_enough_for_holdouts as _check_enough_for_holdouts
from .base import _check_Xy as _check_Xy
from .base import _construct as _construct
from .base import _dense_blocks as _dense_blocks
from .base import _LogisticScoreRule as _LogisticScoreRule
from .base import _n_rows as _n_rows
from .base import _number as _number
from .base import _read_classes as _read_classes
from .base import _read_features as _read_features
from .base import _rows as _rows
from .base import _ScoreRule as _ScoreRule
from .base import _validate_fit as _validate_fit
from .base import _validate_predict as _validate_predict
from .base import _write_classes as _write_classes
from .linear import LinearProbeClassifier, SparseLinearClassifier
from .or_rule import OrRuleClassifier, RandomMatchedOrRule
from .or_rule import _or_predict as _or_predict
from .selection import (
    CRITERIA,
    DEFAULT_FPR_CAP,
    K_CANDIDATES,
    RATE_GRID,
    best_layer,
    by_group_rates,
    firing_rates,
    fpr_thresholds,
    greedy_select,
    group_splits,
    out_of_fold_operating_point,
    out_of_fold_scores,
    rank_features,
)
from .selection import _check_fpr_rows as _check_fpr_rows
from .selection import _fold_metrics as _fold_metrics
from .selection import _rate_thresholds as _rate_thresholds
from .selection import _shift_to_operating_point as _shift_to_operating_point
from .selection import _weighted_rate_threshold as _weighted_rate_threshold
from .serialise import KINDS, classifier_from_dict

__all__ = ["CRITERIA", "DEFAULT_FPR_CAP", "DENSE_BLOCK", "KINDS", "K_CANDIDATES", "MIN_PER_CLASS", "RATE_GRID",
           "LinearProbeClassifier", "OrRuleClassifier", "RandomMatchedOrRule", "SparseLinearClassifier", "best_layer",
           "by_group_rates", "classifier_from_dict", "firing_rates", "fpr_thresholds", "greedy_select", "group_splits",
           "out_of_fold_operating_point", "out_of_fold_scores", "rank_features", "rule_inputs"]
