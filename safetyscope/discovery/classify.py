"""Batch classification that streams, survives interruption and resumes (``streaming``: chunks of
``chunk_rows`` rows, durable parts, ``manifest.json`` naming the input and classifier, resume from the first
missing chunk, parts concatenated in order into OUTPUT)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from .. import streaming
from ..data import count_rows, iter_chunks, require_text, table_format, text_list
from ..errors import SafetyScopeError
from ..streaming import CHUNK_ROWS, content_hash
from .detector import UNVALIDATED, Detector, evidence

RESULT_COLUMNS = ("toxic", "score", "evidence_features", "status")


def classify_chunk(det: Detector, df: pl.DataFrame, text_column: str, lang_column: str | None = None) -> pl.DataFrame:
    """Verdict columns for one chunk. Each row's language comes from ``lang_column``, else the input's ``lang``
    column, else language identification (written to a new ``lang`` column); rows outside the classifier's
    validated languages get status "unvalidated language" (their verdict is still given). A per-language
    classifier scores each row with its language's rule (other languages: its fallback rule).
    ``evidence_features``: the features behind a toxic verdict (``detector.evidence``); empty on clean rows."""
    texts = text_list(df, text_column)
    column = lang_column or "lang"
    given = None
    if column in df.columns:
        given = [None if v is None else str(v) for v in df.get_column(column).to_list()]
    elif lang_column:
        raise SafetyScopeError(f"--lang-column {lang_column!r} is not a column of the input (columns: {df.columns})")
    langs, status = det.languages_and_status(texts, given)
    if given is None:  # identified: written to a new `lang` column
        df = df.with_columns(pl.Series("lang", langs, dtype=pl.String))
    ok = [i for i, s in enumerate(status) if s in ("ok", UNVALIDATED)]
    toxic: list = [None] * len(texts)
    score: list = [None] * len(texts)
    shown: list = [None] * len(texts)
    if ok:
        t, s, f = det.predict([texts[i] for i in ok], langs=[langs[i] for i in ok])
        for j, i in enumerate(ok):
            toxic[i], score[i], shown[i] = bool(t[j]), float(s[j]), evidence(bool(t[j]), f[j])
    clash = [c for c in RESULT_COLUMNS if c in df.columns]
    if clash:
        raise SafetyScopeError(f"input already has column(s) {clash} that classify writes; rename them first")
    return df.with_columns(
        pl.Series("toxic", toxic, dtype=pl.Boolean),
        pl.Series("score", score, dtype=pl.Float64),
        pl.Series("evidence_features", shown, dtype=pl.List(pl.Int64)),
        pl.Series("status", status, dtype=pl.String),
    )


# Bump when the parts' content or the manifest's meaning changes: old parts then never mix with new ones.
MANIFEST_VERSION = 3  # 3: fired_features became evidence_features


def _manifest(input_path: Path, det: Detector, text_column: str, chunk_rows: int, lang_column: str | None = None) -> dict:
    """Everything that changes the parts' content: a resume with any of it different would mix results."""
    # feature names (naming.py) only label features: adding them to a classifier file changes no verdict
    doc = {k: v for k, v in det.to_dict().items() if k != "feature_names"}
    clf_hash = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"version": MANIFEST_VERSION, "input": str(input_path.resolve()), "input_sha256": content_hash(input_path),
            "classifier": clf_hash, "text_column": text_column, "lang_column": lang_column, "chunk_rows": chunk_rows,
            **det.extractor.run_settings()}


def classify_file(det: Detector, input_path: str, output: str, *, text_column: str = "text", chunk_rows: int = CHUNK_ROWS,
                  overwrite: bool = False, progress: bool = True, lang_column: str | None = None) -> dict:
    inp, out = Path(input_path), Path(output)
    streaming.check_input(inp, chunk_rows)
    out_fmt = table_format(out, for_writing=True)
    streaming.check_outputs(out, [inp], overwrite=overwrite)
    with streaming.open_parts(out, lambda: _manifest(inp, det, text_column, chunk_rows, lang_column)) as parts:
        return _run_chunks(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column)


def _run_chunks(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column) -> dict:
    total = count_rows(inp)
    if total == 0:
        raise SafetyScopeError(f"{inp} has no rows")
    done = streaming.check_parts(parts, total, chunk_rows)
    stats = {"rows": total, "resumed_chunks": done, "toxic": 0, "skipped": 0, "unvalidated": 0}
    # a missing or non-text column is named (with the file) before the progress bar starts, not under it;
    # classify_chunk checks every chunk too
    require_text(next(iter_chunks(inp, min(total, 1000))), text_column, inp)

    def results():
        for i, chunk in enumerate(iter_chunks(inp, chunk_rows, start=done * chunk_rows), start=done):
            yield i, classify_chunk(det, chunk, text_column, lang_column), None

    ran = streaming.write_chunks(parts, results(), total=total, done_rows=done * chunk_rows, desc="classify",
                                 progress=progress)
    stats["seconds"] = ran["seconds"]
    files = streaming.finished_parts(parts, total, chunk_rows)
    for f in files:
        counts = pl.scan_parquet(f).select(pl.col("toxic").sum(), (~pl.col("status").is_in(["ok", UNVALIDATED])).sum().alias("skipped"),
                                           (pl.col("status") == UNVALIDATED).sum().alias("unvalidated")).collect().row(0)
        stats["toxic"] += counts[0]
        stats["skipped"] += counts[1]
        stats["unvalidated"] += counts[2]
    streaming.finish(parts, files, out, out_fmt)
    return stats
