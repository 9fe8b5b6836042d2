"""Accuracy of safetyscope.langid.identify on the first 100 test rows of each toxicity language.

    python scripts/langid_accuracy.py ../shared/data/toxicity
"""

import sys
from collections import Counter
from pathlib import Path

import polars as pl

from safetyscope.langid import identify

for path in sorted(Path(sys.argv[1]).glob("*.parquet")):
    if path.stem == "ci_sample":
        continue
    texts = pl.read_parquet(path).filter(pl.col("split") == "test").head(100)["text"].to_list()
    got = identify(texts)
    c = Counter(got)
    print(f"{path.stem}\tcorrect {c[path.stem] / len(got):.2f}\tund {c['und'] / len(got):.2f}\ttop {c.most_common(3)}")
