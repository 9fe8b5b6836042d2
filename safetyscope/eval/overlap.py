"""Dataset footprints in SAE-feature space and how much they overlap (Qwen-Scope evaluation analysis).

A dataset's footprint F is the set of features that fire on at least ``min_count`` of its texts.
overlap(A, B) = |F_A ∩ F_B| / |F_A| (how much of A's footprint B already covers; asymmetric);
overlap_min(A, B) = |F_A ∩ F_B| / min(|F_A|, |F_B|) (symmetric).
Redundancy: the area under the curve of footprint coverage |F(random subset)| / |F| against the
subset's share of the dataset, on [0, 1]; near 1 means a small sample already shows every feature.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SUBSET_SHARES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def footprint(codes: sp.csr_matrix, min_count: int = 1) -> set[int]:
    counts = np.asarray((codes > 0).sum(axis=0)).ravel()
    return set(np.flatnonzero(counts >= min_count).tolist())


def overlap(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a) if a else 0.0


def overlap_min(a: set[int], b: set[int]) -> float:
    return len(a & b) / min(len(a), len(b)) if a and b else 0.0


def redundancy(codes: sp.csr_matrix, *, shares=SUBSET_SHARES, seeds=(0, 1, 2)) -> dict:
    """Coverage curve of random subsets and its normalised area (trapezoid from (0, 0) to (1, 1))."""
    full = footprint(codes)
    n = codes.shape[0]
    curve = []
    for s in shares:
        vals = []
        for seed in seeds:
            rows = np.random.default_rng(seed).permutation(n)[: max(1, int(round(s * n)))]
            vals.append(len(footprint(codes[rows])) / len(full) if full else 0.0)
        curve.append(float(np.mean(vals)))
    x = np.r_[0.0, shares]
    yv = np.r_[0.0, curve]
    auc = float(np.sum((x[1:] - x[:-1]) * (yv[1:] + yv[:-1]) / 2))
    return {"shares": list(shares), "coverage": curve, "redundancy": auc}


def overlap_matrices(footprints: dict[str, set[int]]) -> dict:
    names = list(footprints)
    return {
        "names": names,
        "sizes": [len(footprints[n]) for n in names],
        "overlap": [[overlap(footprints[a], footprints[b]) for b in names] for a in names],
        "overlap_min": [[overlap_min(footprints[a], footprints[b]) for b in names] for a in names],
    }
