"""Shared by the diagnostic scripts: the shared toxicity splits and their SAE features (eval's cache)."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from safetyscope.data import parse_labels, read_table
from safetyscope.features import FeatureConfig, FeatureExtractor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"
COLUMNS = ["text", "label", "lang", "split"]


def load_toxicity() -> pl.DataFrame:
    files = sorted(f for f in DATA.glob("*.parquet") if f.name != "ci_sample.parquet")  # ci_sample repeats rows
    if not files:
        raise SystemExit(f"no toxicity data under {DATA}")
    return pl.concat([read_table(f, columns=COLUMNS).select(COLUMNS) for f in files])


def toxicity_features(model: str, sae: str):
    """(data frame, codes CSR, labels) with `safetyscope eval`'s default settings: served from its cache."""
    df = load_toxicity()
    fx = FeatureExtractor.from_config(FeatureConfig(model=None if model == "default" else model,
                                                    sae=None if sae == "default" else sae))
    X = fx.transform(df["text"].to_list(), progress=True)
    return df, X, parse_labels(df["label"], "toxicity data")
