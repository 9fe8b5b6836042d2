"""How far an OR-rule over these SAE features can go at all, per language (cached features of `safetyscope eval`).

Three numbers per language, greedy OR-rule with K = 10:
- `test`: fitted on the discovery split, scored on the test split (what the evaluation reports, with K fixed);
- `in_sample`: fitted and scored on the discovery split (what the rule can fit);
- `oracle`: fitted and scored on the test split itself - not a result, a ceiling: no OR-rule of 10 of these
  features does much better on that split.
When even the oracle is near the target, the limit is the features, not how they are selected.

    python scripts/or_rule_ceiling.py gemma3-270m safetyscope/assets/sae-gemma3-270m
"""
from __future__ import annotations

import sys

import numpy as np
from _toxicity import toxicity_features
from sklearn.metrics import f1_score

from safetyscope.discovery.rules import OrRuleClassifier
from safetyscope.eval.per_language import split_indices


def main(model: str, sae: str, k: int = 10) -> None:
    df, X, y = toxicity_features(model, sae)
    res = {"test": [], "in_sample": [], "oracle": []}
    for lg in sorted(set(df["lang"].to_list())):
        d, t = split_indices(df, lg)
        rule = OrRuleClassifier(max_features=k).fit(X[d], y[d])
        res["test"].append(f1_score(y[t], rule.predict(X[t])))
        res["in_sample"].append(f1_score(y[d], rule.predict(X[d])))
        res["oracle"].append(f1_score(y[t], OrRuleClassifier(max_features=k).fit(X[t], y[t]).predict(X[t])))
        print(lg, {name: round(v[-1], 3) for name, v in res.items()}, flush=True)
    print("macro", {name: round(float(np.mean(v)), 3) for name, v in res.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])
