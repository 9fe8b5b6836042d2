"""Batch classification that streams, survives interruption and resumes.

Input is read in chunks of ``chunk_rows``; each chunk's result is written to
``OUTPUT.parts/part-NNNNNN.parquet`` (temporary file, fsync, rename), so a finished part is never
half-written. A rerun of the same command finds the parts, checks they belong to the same input and
classifier (``manifest.json``), and continues from the first missing chunk. When every chunk is there
the parts are concatenated, in order, into OUTPUT and the parts directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..data import count_rows, iter_chunks, require_columns, table_format
from ..errors import SafetyScopeError
from .detector import Detector

RESULT_COLUMNS = ("toxic", "score", "fired_features", "status")
UNVALIDATED = "unvalidated language"  # a verdict is given, but the classifier was never checked on this language


def _fsync_write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def classify_chunk(det: Detector, df: pl.DataFrame, text_column: str, lang_column: str | None = None) -> pl.DataFrame:
    """Verdict columns for one chunk. Each row's language comes from ``lang_column``, else the input's ``lang``
    column, else language identification (written to a new ``lang`` column); rows outside the classifier's
    validated languages get status "unvalidated language" (their verdict is still given)."""
    texts = df.get_column(text_column).to_list()
    status = ["null text" if t is None else "empty text" if not str(t).strip() else "ok" for t in texts]
    column = lang_column or "lang"
    if column in df.columns:
        langs = [None if v is None else str(v) for v in df.get_column(column).to_list()]
    elif lang_column:
        raise SafetyScopeError(f"--lang-column {lang_column!r} is not a column of the input (columns: {df.columns})")
    else:
        from ..langid import identify

        langs = identify(texts)
        df = df.with_columns(pl.Series("lang", langs, dtype=pl.String))
    validated = set(det.validated_languages())
    status = [UNVALIDATED if s == "ok" and lang not in validated else s for s, lang in zip(status, langs)]
    ok = [i for i, s in enumerate(status) if s in ("ok", UNVALIDATED)]
    toxic: list = [None] * len(texts)
    score: list = [None] * len(texts)
    fired: list = [None] * len(texts)
    if ok:
        t, s, f = det.predict([texts[i] for i in ok])
        for j, i in enumerate(ok):
            toxic[i], score[i], fired[i] = bool(t[j]), float(s[j]), f[j]
    clash = [c for c in RESULT_COLUMNS if c in df.columns]
    if clash:
        raise SafetyScopeError(f"input already has column(s) {clash} that classify writes; rename them first")
    return df.with_columns(
        pl.Series("toxic", toxic, dtype=pl.Boolean),
        pl.Series("score", score, dtype=pl.Float64),
        pl.Series("fired_features", fired, dtype=pl.List(pl.Int64)),
        pl.Series("status", status, dtype=pl.String),
    )


def _manifest(input_path: Path, classifier: dict, text_column: str, chunk_rows: int) -> dict:
    st = input_path.stat() if input_path.is_file() else None
    clf_hash = hashlib.sha256(json.dumps(classifier, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"input": str(input_path.resolve()), "input_size": st.st_size if st else None,
            "input_mtime_ns": st.st_mtime_ns if st else None, "classifier": clf_hash,
            "text_column": text_column, "chunk_rows": chunk_rows}


def classify_file(det: Detector, input_path: str, output: str, *, text_column: str = "text", chunk_rows: int = 1024,
                  overwrite: bool = False, progress: bool = True, lang_column: str | None = None) -> dict:
    inp, out = Path(input_path), Path(output)
    table_format(inp)
    out_fmt = table_format(out, for_writing=True)
    if out.exists() and not overwrite:
        raise SafetyScopeError(f"{out} already exists; pass --overwrite to replace it")
    if out.resolve() == inp.resolve():
        raise SafetyScopeError("the output must not be the input file")
    parts = out.with_name(out.name + ".parts")
    manifest = _manifest(inp, det.to_dict(), text_column, chunk_rows)
    if parts.exists():
        old = json.loads((parts / "manifest.json").read_text()) if (parts / "manifest.json").exists() else None
        if old != manifest:
            raise SafetyScopeError(f"{parts} holds an interrupted run with another input, classifier or chunk size; "
                                   "delete it to start over")
    else:
        parts.mkdir(parents=True)
        (parts / "manifest.json").write_text(json.dumps(manifest, indent=2))
    total = count_rows(inp)
    if total == 0:
        shutil.rmtree(parts)
        raise SafetyScopeError(f"{inp} has no rows")
    n_chunks = (total + chunk_rows - 1) // chunk_rows
    done = 0
    while (parts / f"part-{done:06d}.parquet").exists():
        done += 1
    resumed = done
    stats = {"rows": total, "resumed_chunks": resumed, "toxic": 0, "skipped": 0, "unvalidated": 0}
    bar = tqdm(total=total, initial=min(done * chunk_rows, total), unit="rows", disable=not progress, desc="classify")
    t0 = time.perf_counter()
    for i, chunk in enumerate(iter_chunks(inp, chunk_rows, start=done * chunk_rows), start=done):
        if i == done == 0:
            require_columns(chunk, [text_column], inp)
        res = classify_chunk(det, chunk, text_column, lang_column)
        _fsync_write_parquet(res, parts / f"part-{i:06d}.parquet")
        bar.update(chunk.height)
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    files = [parts / f"part-{i:06d}.parquet" for i in range(n_chunks)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise SafetyScopeError(f"parts missing after the run: {missing[:5]}; rerun to complete")
    for f in files:
        counts = pl.scan_parquet(f).select(pl.col("toxic").sum(), (~pl.col("status").is_in(["ok", UNVALIDATED])).sum().alias("skipped"),
                                           (pl.col("status") == UNVALIDATED).sum().alias("unvalidated")).collect().row(0)
        stats["toxic"] += counts[0]
        stats["skipped"] += counts[1]
        stats["unvalidated"] += counts[2]
    _assemble(files, out, out_fmt)
    shutil.rmtree(parts)
    return stats


def _assemble(files: list[Path], out: Path, fmt: str) -> None:
    """Concatenate parts in order, one part in memory at a time."""
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "parquet":
        writer = None
        for f in files:
            t = pq.read_table(f)
            writer = writer or pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
        writer.close()
    elif fmt in ("jsonl", "csv"):
        with open(tmp, "wb") as fh:
            for n, f in enumerate(files):
                df = pl.read_parquet(f)
                if fmt == "jsonl":
                    df.write_ndjson(fh)
                else:
                    df = df.with_columns(pl.col("fired_features").map_elements(
                        lambda v: None if v is None else str(list(v)), return_dtype=pl.String))
                    df.write_csv(fh, include_header=n == 0)
    else:
        import datasets

        ds = datasets.Dataset.from_parquet([str(f) for f in files])
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
