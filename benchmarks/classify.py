"""Throughput of `classify` against plain feature extraction on the same file, in one process.

Classification = feature extraction + the rule + chunked durable output; the rule and the I/O should
add little (target: < 10%). Both runs use the same extractor with the per-text cache disabled, and
alternate twice so neither benefits from warm-up order.

    python benchmarks/classify.py [--input FILE] [--classifier default] [--rows N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from safetyscope.data import read_table
from safetyscope.discovery.classify import classify_file
from safetyscope.discovery.detector import Detector

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity" / "ci_sample.parquet"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "comments.csv"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SHARED if SHARED.exists() else EXAMPLE))
    ap.add_argument("--classifier", default="default")
    ap.add_argument("--rows", type=int, default=480)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    args = ap.parse_args(argv)

    det = Detector.load(args.classifier, cache=False)
    df = read_table(args.input, columns=["text"]).head(args.rows).select("text")
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "input.parquet"
        df.write_parquet(inp)
        texts = df["text"].to_list()
        det.extractor.transform(texts[:32])  # warm-up: first-call allocations, thread pools
        feat_s, clf_s = [], []
        for rep in range(2):
            t0 = time.perf_counter()
            det.extractor.transform(texts)
            feat_s.append(time.perf_counter() - t0)
            out = Path(tmp) / f"out{rep}.parquet"
            t0 = time.perf_counter()
            classify_file(det, str(inp), str(out), chunk_rows=args.chunk_rows, progress=False)
            clf_s.append(time.perf_counter() - t0)
        n_out = pl.read_parquet(out).height
    f, c = min(feat_s), min(clf_s)
    print(f"input: {args.input} ({len(texts)} rows), classifier: {args.classifier}, "
          f"dtype: {next(det.extractor.backbone.model.parameters()).dtype}")
    print(f"{'run':<22}{'seconds':>10}{'rows/s':>10}")
    print(f"{'features (transform)':<22}{f:>10.2f}{len(texts) / f:>10.1f}")
    print(f"{'classify (file->file)':<22}{c:>10.2f}{n_out / c:>10.1f}")
    print(f"classify overhead over feature extraction: {100 * (c / f - 1):+.1f}% (best of 2 runs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
