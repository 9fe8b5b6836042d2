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

from ..data import count_rows, csv_safe, iter_chunks, require_text, table_format, text_list
from ..errors import SafetyScopeError
from ..outputs import check_output, mark, output_errors, output_lock, remove_temp, replace, temp_path
from .detector import UNVALIDATED, Detector

RESULT_COLUMNS = ("toxic", "score", "fired_features", "status")


def _fsync_write(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename: a finished file is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_write_parquet(df: pl.DataFrame, path: Path) -> None:
    _fsync_write(path, df.write_parquet)


def classify_chunk(det: Detector, df: pl.DataFrame, text_column: str, lang_column: str | None = None) -> pl.DataFrame:
    """Verdict columns for one chunk. Each row's language comes from ``lang_column``, else the input's ``lang``
    column, else language identification (written to a new ``lang`` column); rows outside the classifier's
    validated languages get status "unvalidated language" (their verdict is still given). A per-language
    classifier scores each row with its language's rule (other languages: its fallback rule)."""
    texts = text_list(df, text_column)
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
        t, s, f = det.predict([texts[i] for i in ok], langs=[langs[i] for i in ok])
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


# Bump when the parts' content or the manifest's meaning changes: old parts then never mix with new ones.
MANIFEST_VERSION = 2


def content_hash(path: Path) -> str:
    """Streamed SHA-256 of a file, or of every file of a directory (an HF dataset) with its relative name:
    size and mtime alone miss an input rewritten in place."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _manifest(input_path: Path, det: Detector, text_column: str, chunk_rows: int, lang_column: str | None = None) -> dict:
    """Everything that changes the parts' content: a resume with any of it different would mix results."""
    clf_hash = hashlib.sha256(json.dumps(det.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    fx = det.extractor
    return {"version": MANIFEST_VERSION, "input": str(input_path.resolve()), "input_sha256": content_hash(input_path),
            "classifier": clf_hash, "text_column": text_column, "lang_column": lang_column, "chunk_rows": chunk_rows,
            # dtype and batch size can move activations near 0 across the firing threshold (padding, bf16)
            "dtype": str(next(fx.backbone.model.parameters()).dtype), "device": fx.backbone.device.split(":")[0],
            "batch_size": fx.batch_size, "batch_tokens": fx.batch_tokens,
            "max_length": fx.max_length, "skip_first_token": fx.skip_first_token,
            "pool": fx.pool}


def _read_manifest(parts: Path) -> dict:
    try:
        return json.loads((parts / "manifest.json").read_text())
    except (OSError, ValueError):
        raise SafetyScopeError(f"{parts / 'manifest.json'} is missing or unreadable (truncated?); delete {parts} "
                               "to start over") from None


def _part_rows(f: Path) -> int | None:
    try:
        return pq.read_metadata(f).num_rows
    except Exception:  # a part this tool did not write completely (it writes tmp + rename): unreadable
        return None


def _check_parts(parts: Path, total: int, chunk_rows: int) -> int:
    """Validate every part against the chunk plan; returns how many leading chunks are done."""
    n_chunks = (total + chunk_rows - 1) // chunk_rows
    done = 0
    for f in sorted(parts.glob("part-*.parquet")):
        i = int(f.stem.split("-")[1]) if f.stem.split("-")[1].isdigit() else -1
        want = min(chunk_rows, total - i * chunk_rows) if 0 <= i < n_chunks else None
        got = _part_rows(f)
        if want is None or got != want:
            raise SafetyScopeError(f"{f} holds {got if got is not None else 'no readable'} rows where the chunk plan "
                                   f"needs {want if want is not None else 'no such part'}; delete that file to "
                                   "recompute it (or delete the whole .parts directory to start over)")
    while (parts / f"part-{done:06d}.parquet").exists():
        done += 1
    return done


def classify_file(det: Detector, input_path: str, output: str, *, text_column: str = "text", chunk_rows: int = 1024,
                  overwrite: bool = False, progress: bool = True, lang_column: str | None = None) -> dict:
    inp, out = Path(input_path), Path(output)
    table_format(inp)
    if not inp.exists():
        raise SafetyScopeError(f"{inp}: no such file or directory")
    if chunk_rows < 1:
        raise SafetyScopeError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    out_fmt = table_format(out, for_writing=True)
    check_output(out, inputs=[inp], overwrite=overwrite)
    parts = out.with_name(out.name + ".parts")
    check_output(parts, inputs=[inp], overwrite=True, kind="parts directory")
    with output_lock(out):
        return _classify_locked(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column)


def _classify_locked(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column) -> dict:
    manifest = _manifest(inp, det, text_column, chunk_rows, lang_column)
    created = not parts.exists()
    if not created:
        old = _read_manifest(parts)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise SafetyScopeError(f"{parts} holds an interrupted run with another {', '.join(diff)}; rerun it with "
                                   f"the same settings and input, or delete {parts} to start over")
    else:
        with output_errors(parts):
            parts.mkdir(parents=True)
            mark(parts)
            _fsync_write(parts / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    try:
        return _run_chunks(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column)
    except BaseException:
        # A run that wrote no part leaves nothing behind (else the corrected command would be refused).
        if created and parts.is_dir() and not any(parts.glob("part-*.parquet")):
            shutil.rmtree(parts, ignore_errors=True)
        raise


def _run_chunks(det, inp, out, parts, out_fmt, text_column, chunk_rows, progress, lang_column) -> dict:
    total = count_rows(inp)
    if total == 0:
        raise SafetyScopeError(f"{inp} has no rows")
    n_chunks = (total + chunk_rows - 1) // chunk_rows
    done = _check_parts(parts, total, chunk_rows)
    resumed = done
    stats = {"rows": total, "resumed_chunks": resumed, "toxic": 0, "skipped": 0, "unvalidated": 0}
    t0 = time.perf_counter()
    hint = "; free space (or fix the path) and rerun the same command to resume from the finished parts"
    with tqdm(total=total, initial=min(done * chunk_rows, total), unit="rows", disable=not progress,
              desc="classify") as bar:  # closed on errors too, so the error line starts on its own line
        for i, chunk in enumerate(iter_chunks(inp, chunk_rows, start=done * chunk_rows), start=done):
            if i == done == 0:
                require_text(chunk, text_column, inp)  # names the file; classify_chunk checks every chunk too
            res = classify_chunk(det, chunk, text_column, lang_column)
            with output_errors(parts, hint):
                _fsync_write_parquet(res, parts / f"part-{i:06d}.parquet")
            bar.update(chunk.height)
    stats["seconds"] = time.perf_counter() - t0
    files = [parts / f"part-{i:06d}.parquet" for i in range(n_chunks)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise SafetyScopeError(f"parts missing after the run: {missing[:5]}; rerun to complete")
    _check_parts(parts, total, chunk_rows)  # nothing forged or swapped in meanwhile
    for f in files:
        counts = pl.scan_parquet(f).select(pl.col("toxic").sum(), (~pl.col("status").is_in(["ok", UNVALIDATED])).sum().alias("skipped"),
                                           (pl.col("status") == UNVALIDATED).sum().alias("unvalidated")).collect().row(0)
        stats["toxic"] += counts[0]
        stats["skipped"] += counts[1]
        stats["unvalidated"] += counts[2]
    with output_errors(out, hint):
        _assemble(files, out, out_fmt)
    shutil.rmtree(parts)
    return stats


def _assemble(files: list[Path], out: Path, fmt: str) -> None:
    """Concatenate parts in order, one part in memory at a time."""
    tmp = temp_path(out)
    remove_temp(tmp)
    try:
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
                        csv_safe(df).write_csv(fh, include_header=n == 0)
        else:
            import datasets

            ds = datasets.Dataset.from_parquet([str(f) for f in files])
            ds.save_to_disk(str(tmp))
        replace(tmp, out)
    except BaseException:
        remove_temp(tmp)
        raise
