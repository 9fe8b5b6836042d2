"""Reading a classifier file's rule object back into an estimator: the kind registry and the whole-rule check."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import SafetyScopeError
from .linear import LinearProbeClassifier, SparseLinearClassifier
from .or_rule import OrRuleClassifier

KINDS: dict[str, Any] = {"or_rule": OrRuleClassifier, "sparse_linear": SparseLinearClassifier, "linear": LinearProbeClassifier}


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
