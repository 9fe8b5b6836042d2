"""Cross-lingual transfer and data efficiency of the OR-rule, on features extracted once.

- transfer: discover on language A's discovery split, test on every language B's test split (F1
  matrix), and the Jaccard overlap of the top-10 delta-ranked feature sets for every pair;
- efficiency: F1 on the test split against the share of the discovery split used (stratified
  subsamples, several seeds). K is fixed to the K chosen on the full discovery split of that language,
  so that tiny subsets (1% of 2,000 rows is 20) need no hold-out of their own.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from ..discovery.rules import OrRuleClassifier, rank_features
from .config import FRACTIONS, SEEDS
from .per_language import split_indices


def transfer_matrix(df, y, codes, langs, *, seed: int = 0, top: int = 10, progress: bool = True) -> dict:
    idx = {la: split_indices(df, la) for la in langs}
    f1 = np.full((len(langs), len(langs)), np.nan)
    tops = {}
    for i, a in enumerate(tqdm(langs, desc="transfer", disable=not progress)):
        d_a = idx[a][0]
        clf = OrRuleClassifier(random_state=seed).fit(codes[d_a], y[d_a])
        tops[a] = set(rank_features(codes[d_a], y[d_a])[0][:top].tolist())
        for j, b in enumerate(langs):
            t_b = idx[b][1]
            f1[i, j] = f1_score(y[t_b], clf.predict(codes[t_b]), zero_division=0)
    jac = np.array([[len(tops[a] & tops[b]) / len(tops[a] | tops[b]) for b in langs] for a in langs])
    return {"langs": list(langs), "f1": f1.tolist(), "jaccard_top10": jac.tolist()}


def efficiency_curves(df, y, codes, langs, *, fractions=FRACTIONS, seeds=SEEDS, progress: bool = True) -> dict:
    out: dict = {"fractions": list(fractions), "seeds": list(seeds), "langs": {}}
    for la in tqdm(langs, desc="efficiency", disable=not progress):
        d_idx, t_idx = split_indices(df, la)
        full = OrRuleClassifier(random_state=seeds[0]).fit(codes[d_idx], y[d_idx])
        k = len(full.features_)
        full_f1 = f1_score(y[t_idx], full.predict(codes[t_idx]), zero_division=0)
        means, stds = [], []
        for frac in fractions:
            scores = []
            for s in seeds:
                sub = d_idx if frac >= 1.0 else _stratified_subset(d_idx, y, frac, s)
                clf = OrRuleClassifier(max_features=k, random_state=s).fit(codes[sub], y[sub])
                scores.append(f1_score(y[t_idx], clf.predict(codes[t_idx]), zero_division=0))
            means.append(float(np.mean(scores)))
            stds.append(float(np.std(scores)))
        reach = next((f for f, m in zip(fractions, means) if m >= 0.99 * full_f1), None)
        out["langs"][la] = {"k": k, "full_f1": float(full_f1), "mean_f1": means, "std_f1": stds,
                            "smallest_fraction_99pct": reach}
    macro_full = np.mean([v["full_f1"] for v in out["langs"].values()]) if out["langs"] else 0.0
    macro = np.mean([v["mean_f1"] for v in out["langs"].values()], axis=0) if out["langs"] else []
    out["macro"] = {"full_f1": float(macro_full), "mean_f1": [float(m) for m in macro],
                    "smallest_fraction_99pct": next((f for f, m in zip(fractions, macro) if m >= 0.99 * macro_full), None),
                    "share_of_full_at_10pct": (float(macro[list(fractions).index(0.1)] / macro_full)
                                               if 0.1 in fractions and macro_full else None)}
    return out


def _stratified_subset(idx: np.ndarray, y: np.ndarray, frac: float, seed: int) -> np.ndarray:
    n = max(4, int(round(frac * len(idx))))
    if n >= len(idx):
        return idx
    sub, _ = train_test_split(idx, train_size=n, stratify=y[idx], random_state=seed)
    return np.sort(sub)
