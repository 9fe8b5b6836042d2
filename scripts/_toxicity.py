"""Shared by the diagnostic scripts: the shared toxicity splits and their SAE features (eval's cache)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from safetyscope.discovery.discover import parse_labels
from safetyscope.features import FeatureConfig, FeatureExtractor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"


def load_toxicity() -> pl.DataFrame:
    files = sorted(f for f in DATA.glob("*.parquet") if f.name != "ci_sample.parquet")  # ci_sample repeats rows
    if not files:
        raise SystemExit(f"no toxicity data under {DATA}")
    return pl.concat([pl.read_parquet(f).select("text", "label", "lang", "split") for f in files])


def toxicity_features(model: str, sae: str):
    """(codes CSR, labels, lang, split) with `safetyscope eval`'s default settings: served from its cache."""
    df = load_toxicity()
    fx = FeatureExtractor.from_config(FeatureConfig(model=None if model == "default" else model,
                                                    sae=None if sae == "default" else sae))
    X = fx.transform(df["text"].to_list(), progress=True)
    return X, parse_labels(df["label"], "toxicity data"), df["lang"].to_numpy(), df["split"].to_numpy()


def split_idx(lang: np.ndarray, split: np.ndarray, lg: str) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero((lang == lg) & (split == "discovery")), np.flatnonzero((lang == lg) & (split == "test"))
