"""Choose the discovery settings of the shipped harmful-request OR-rule on the `seed` split only.

For each candidate (selection, --fpr-cap) the OR-rule (K chosen as `discover` does) is fitted on 4 of 5
stratified folds of the seed rows and scored on the fifth: F1, and the flag rate on the held-out XSTest `safe`
prompts (harmless prompts that look dangerous: the over-refusal constraint). Pool rows are never read.

    python scripts/harmful_request_settings.py ../shared/data/safety/prompts.parquet --langs en
"""

from __future__ import annotations

import argparse

import numpy as np
from eval_harmful_request import load_splits
from sklearn.model_selection import StratifiedKFold

from safetyscope.data import parse_labels
from safetyscope.discovery.rules import OrRuleClassifier
from safetyscope.eval.metrics import binary_metrics
from safetyscope.features import FeatureConfig, FeatureExtractor

CANDIDATES = [("greedy", "auto"), ("greedy", 0.02), ("greedy", 0.005), ("delta", 0.01)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts")
    ap.add_argument("--langs", default="en")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed-rows", type=int, default=-1, help="random seed rows to use, as eval_harmful_request.py")
    args = ap.parse_args()
    df, _ = load_splits(args.prompts, args.langs.split(","), 0, args.seed_rows)
    y = parse_labels(df.get_column("label"), args.prompts)
    safe = ((df.get_column("source") == "xstest") & (df.get_column("label") == "benign")).to_numpy()
    X = FeatureExtractor.from_config(FeatureConfig()).transform(df.get_column("prompt").to_list())
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(np.zeros(len(y)), 2 * y + safe))
    print(f"{len(y)} seed rows ({y.sum()} harmful, {len(y) - y.sum()} benign, {safe.sum()} XSTest safe); "
          f"{args.folds}-fold CV")
    print("| selection | fpr_cap | K (full fit) | CV F1 | CV precision | CV recall | CV XSTest safe flag rate |")
    print("|---|---|---|---|---|---|---|")
    for selection, cap in CANDIDATES:
        pred = np.zeros(len(y), dtype=bool)
        for fit, test in folds:
            rule = OrRuleClassifier(selection=selection, fpr_cap=cap).fit(X[fit], y[fit])
            pred[test] = rule.predict(X[test]).astype(bool)
        k = OrRuleClassifier(selection=selection, fpr_cap=cap).fit(X, y).features_.size
        m = binary_metrics(y, pred)
        print(f"| {selection} | {cap} | {k} | {m['f1']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
              f"{pred[safe].mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
