"""How the delta-ranked OR-rule's per-feature firing cap trades off on every language, beside greedy selection
(cached features of `safetyscope eval`).

For each language: fit the delta-ranked OR-rule (`selection="delta"`, K from {1, 2, 5, 10} on hold-outs) on its
discovery split with each per-feature clean-FPR cap in {2%, 5%, 10%, 20%, none}, test on its test split; `sel`
picks the cap with the best hold-out F1 (discovery data only); `greedy` is the default OR-rule (greedy selection
of feature + threshold pairs). Prints test F1 per language and the macro means.

    python scripts/or_rule_cap_sweep.py gemma3-270m safetyscope/assets/sae-gemma3-270m
    python scripts/or_rule_cap_sweep.py default default
"""
from __future__ import annotations

import sys

import numpy as np
from _toxicity import toxicity_features
from sklearn.metrics import f1_score

from safetyscope.discovery.rules import OrRuleClassifier
from safetyscope.eval.per_language import split_indices

CAPS = [0.02, 0.05, 0.1, 0.2, None]


def main(model: str, sae: str) -> None:
    df, X, y = toxicity_features(model, sae)
    res = {c: [] for c in CAPS} | {"sel": [], "greedy": []}
    for lg in sorted(set(df["lang"].to_list())):
        d, t = split_indices(df, lg)
        best = None
        for c in CAPS:
            m = OrRuleClassifier(selection="delta", fpr_cap=c).fit(X[d], y[d])
            res[c].append(f1_score(y[t], m.predict(X[t])))
            if best is None or max(m.k_scores_.values()) > best[0]:
                best = (max(m.k_scores_.values()), res[c][-1], c)
        res["sel"].append(best[1])
        res["greedy"].append(f1_score(y[t], OrRuleClassifier().fit(X[d], y[d]).predict(X[t])))
        print(lg, {str(c): round(res[c][-1], 3) for c in CAPS}, "sel", best[2], round(best[1], 3),
              "greedy", round(res["greedy"][-1], 3), flush=True)
    print("macro", {str(k): round(float(np.mean(v)), 3) for k, v in res.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])
