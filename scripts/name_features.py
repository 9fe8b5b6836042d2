"""Add readable feature names (``feature_names``: top tokens and one example context per feature) to existing
classifier files in place, without refitting: the names `discover` now writes itself (safetyscope.discovery.naming).
Only the ``feature_names`` key of each file changes; verdicts do not.

    python scripts/name_features.py safetyscope/assets/toxicity-smollm2-135m-instruct.json \\
        --data ../shared/data/toxicity/en.parquet --split discovery

--data FILE[:COLUMN] (repeatable; COLUMN: the text column, default --text-column): the texts the features are named
from, normally the classifier's discovery data (safetyscope/assets/README.md gives each shipped file's). --split keeps
rows of that `split` where a file has the column; --max-rows samples that many rows (seed 0) when there are more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from safetyscope.data import read_table, text_list
from safetyscope.discovery.detector import FORMAT, Detector
from safetyscope.discovery.naming import names_record
from safetyscope.provenance import read_document, write_document


def load_texts(specs: list[str], text_column: str, split: str | None, max_rows: int | None) -> tuple[list[str], str]:
    """(non-empty texts of every --data file, what they are in words)."""
    texts, said = [], []
    for spec in specs:
        path, _, column = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        column = column or text_column
        df = read_table(path)
        if split is not None and "split" in df.columns:
            df = df.filter(pl.col("split") == split)
        got = [t for t in text_list(df, column, path) if t is not None and t.strip()]
        texts += got
        said.append(f"{path} ({column}, {len(got)} rows{f', split {split}' if split and 'split' in df.columns else ''})")
    if max_rows is not None and len(texts) > max_rows:
        texts = pl.Series(texts).sample(max_rows, seed=0).to_list()
        said.append(f"a random {max_rows} of them (seed 0)")
    return texts, "; ".join(said)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("classifiers", nargs="+", help="classifier JSON files, rewritten in place")
    ap.add_argument("--data", nargs="+", required=True, metavar="FILE[:COLUMN]")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--split", default=None)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="model dtype for extraction (as classify's --dtype)")
    a = ap.parse_args(argv)
    texts, where = load_texts(a.data, a.text_column, a.split, a.max_rows)
    if not texts:
        sys.exit("error: no texts in --data")
    for path in a.classifiers:
        det = Detector.load(path, dtype=a.dtype)
        codes = det.extractor.extract(texts, progress=True).codes
        doc = read_document(path, FORMAT, "classifier")
        doc["feature_names"] = names_record(det, texts, codes, where, progress=True)
        write_document(doc, path)
        print(f"{path}: named {len(doc['feature_names']['features'])} features from {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
