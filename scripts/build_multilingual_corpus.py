#!/usr/bin/env python
"""Build the language-balanced offline corpus for a multilingual SAE (parquet: text, source, lang).

Used for the Gemma 3 270M SAE (``safetyscope/assets/sae-gemma3-270m``). Sources, all from the shared
research pack (never shipped; only the trained SAE weights are):

* ``toxicity/<lang>.parquet`` of all 14 languages, rows with ``split == "discovery"`` only (the ``test``
  split is never read; ``ci_sample.parquet`` is skipped: it is a subset of the language files and holds
  test rows). At most ``--tox-per-lang`` texts per language, half toxic and half clean;
* ``safety/prompts.parquet`` (column ``prompt``, ``seed`` and ``pool`` rows): at most
  ``--safety-per-lang`` prompts per language, half harmful and half benign where the language has both.

Caps per language keep English (and the big xsafety languages) from dominating; small languages (uk, ja)
contribute all they have. Deterministic: the same inputs and arguments give the same rows in the same order.

    python scripts/build_multilingual_corpus.py -o /tmp/sae_corpus_multi.parquet
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import polars as pl
from build_sae_corpus import DATA, discovery_splits  # the same rule for which toxicity rows may be used


def _balanced(df: pl.DataFrame, by: str, cap: int, seed: int) -> pl.DataFrame:
    """Up to ``cap`` rows, split evenly over the values of ``by`` (a value short of its share gives the
    rest to the others), each value's rows drawn by a seeded shuffle."""
    groups = {v: g.sort("text").sample(fraction=1.0, shuffle=True, seed=seed)
              for v, g in sorted(((k[0], g) for k, g in df.group_by(by)), key=lambda x: str(x[0]))}
    take = dict.fromkeys(groups, 0)
    left = cap
    while left > 0:
        open_ = [v for v in groups if take[v] < groups[v].height]
        if not open_:
            break
        share = max(1, left // len(open_))
        for v in open_:
            n = min(share, groups[v].height - take[v], left)
            take[v] += n
            left -= n
    return pl.concat([groups[v].head(take[v]) for v in groups]) if groups else df.head(0)


def toxicity_rows(data: Path, cap: int, seed: int) -> pl.DataFrame:
    frames = []
    for stem, df in discovery_splits(data):
        df = _balanced(df.select("text", "label", "lang"), "label", cap, seed)
        frames.append(df.select("text", pl.lit("toxicity:" + stem).alias("source"), "lang"))
    return pl.concat(frames)


def safety_rows(data: Path, cap: int, seed: int) -> pl.DataFrame:
    df = pl.read_parquet(data / "safety" / "prompts.parquet").select(
        pl.col("prompt").alias("text"), "label", "lang", (pl.lit("safety:") + pl.col("source")).alias("source"))
    frames = [_balanced(g, "label", cap, seed) for _, g in sorted(df.group_by("lang"), key=lambda x: x[0][0])]
    return pl.concat(frames).select("text", "source", "lang")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="/tmp/sae_corpus_multi.parquet")
    ap.add_argument("--data", default=str(DATA), help="the shared data pack [default: ../shared/data]")
    ap.add_argument("--tox-per-lang", type=int, default=1200, help="toxicity discovery texts per language (cap)")
    ap.add_argument("--safety-per-lang", type=int, default=400, help="safety prompts per language (cap)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = Path(a.data)
    df = pl.concat([toxicity_rows(data, a.tox_per_lang, a.seed), safety_rows(data, a.safety_per_lang, a.seed)])
    df = df.filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
    df = df.unique(subset="text", keep="first", maintain_order=True)
    # seeded shuffle so that a token budget taken from the top is a uniform sample of the sources
    df = df.with_row_index("i").sample(fraction=1.0, shuffle=True, seed=a.seed).drop("i")
    os.makedirs(Path(a.output).parent, exist_ok=True)
    df.write_parquet(a.output)
    for lang, src, n in df.group_by("lang", pl.col("source").str.split(":").list.first()).len().sort("lang", "source").iter_rows():
        print(f"{lang}\t{src}\t{n}", file=sys.stderr)
    print(f"wrote {df.height} texts to {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
