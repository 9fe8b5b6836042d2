"""Dataset footprints in SAE-feature space and how much they overlap (Qwen-Scope evaluation analysis).

A dataset's footprint F is the set of features that fire on at least ``min_count`` of its texts.
overlap(A, B) = |F_A ∩ F_B| / |F_A| (how much of A's footprint B already covers; asymmetric);
overlap_min(A, B) = |F_A ∩ F_B| / min(|F_A|, |F_B|) (symmetric).
Redundancy: the area under the curve of footprint coverage |F(random subset)| / |F| against the
subset's share of the dataset, on [0, 1]; near 1 means a small sample already shows every feature.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import SafetyScopeError

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


def run_overlap(data: list[str | os.PathLike], output: str | os.PathLike, cfg, *, names=(), text_column: str = "text",
                min_count: int = 1, overwrite: bool = False) -> tuple[dict, str]:
    """`safetyscope overlap`: the footprint of each dataset in ``data`` under the features of ``cfg``
    (a FeatureConfig), their pairwise overlap and redundancy, written to the report directory ``output`` as
    overlap.json, overlap.md and overlap.png. Returns (the record, the markdown)."""
    from ..data import read_table, text_list
    from ..features import FeatureExtractor
    from ..outputs import check_report_dir
    from ..reports import markdown_grid, write_json, write_text
    from .report import plot_heatmap

    if names and len(names) != len(data):
        raise SafetyScopeError(f"{len(names)} --name for {len(data)} dataset(s)")
    names = list(names) or [Path(p).stem if Path(p).suffix else Path(p).name for p in data]
    out = check_report_dir(output, inputs=data, overwrite=overwrite)
    fx = FeatureExtractor.from_config(cfg)
    prints, red = {}, {}
    for name, path in zip(names, data):
        texts = [t for t in text_list(read_table(path, columns=[text_column]), text_column, path)
                 if t is not None and t.strip()]
        if not texts:
            raise SafetyScopeError(f"{path}: no non-empty texts")
        codes = fx.transform(texts, progress=True)
        prints[name] = footprint(codes, min_count)
        red[name] = redundancy(codes)
    res = overlap_matrices(prints)
    res.update({"pool": cfg.pool, "min_count": min_count, "redundancy": red, "data": [str(d) for d in data],
                "model": fx.backbone.model_id, "sae": cfg.sae or "default", "layer": fx.layer})
    write_json(out / "overlap.json", res)
    header = ["A \\ B"] + names
    body = [[a] + [float(v) for v in r] for a, r in zip(names, res["overlap"])]
    md = [f"# Footprint overlap (pool={cfg.pool}, min_count={min_count})", "",
          "overlap(A, B) = |F_A ∩ F_B| / |F_A|: the share of A's features that B also fires.", "",
          markdown_grid(header, body), "", "| dataset | footprint size | redundancy |", "|---|---|---|"]
    md += [f"| {n} | {s} | {red[n]['redundancy']:.3f} |" for n, s in zip(names, res["sizes"])]
    text = "\n".join(md) + "\n"
    write_text(out / "overlap.md", text)
    plot_heatmap(res["overlap"], names, names, "overlap(A=row, B=column)", out / "overlap.png", xlabel="B", ylabel="A")
    return res, text.rstrip("\n")
