"""Chunked, durable, resumable table output: what `classify` and `features` share.

A run cuts its input into chunks of ``chunk_rows`` rows; each chunk's result is written to
``OUTPUT.parts/part-NNNNNN.parquet`` (temporary file, fsync, rename), so a finished part is never
half-written and memory holds one chunk at a time. ``manifest.json`` records what decides the parts'
content (input identity, settings, model fingerprints: the caller builds it); a rerun with the same
manifest continues from the first missing chunk, one with another is refused. When every chunk is there
the parts are concatenated, in order, into OUTPUT (or, ``keep_shards``, the parts directory becomes OUTPUT)
and the parts directory is removed. One run at a time per OUTPUT (``output_lock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .data import csv_safe, table_format
from .errors import SafetyScopeError, check_number
from .outputs import check_output, mark, output_errors, output_lock, remove_temp, replace, temp_path

# Rows per durable part (`--chunk-rows` of features and classify, local and Ray): memory holds one chunk, and a
# killed run loses at most one chunk's work.
CHUNK_ROWS = 1024
RESUME_HINT = "; free space (or fix the path) and rerun the same command to resume from the finished parts"


def check_chunk_rows(chunk_rows) -> None:
    """--chunk-rows, the one place it is checked (local features and classify through check_input, and Ray)."""
    check_number("--chunk-rows", chunk_rows, low=1, high=2**31 - 1, integer=True)


def check_input(inp: Path, chunk_rows: int) -> None:
    """The input table and --chunk-rows, checked before any work (the same words for classify and features)."""
    table_format(inp)
    if not inp.exists():
        raise SafetyScopeError(f"{inp}: no such file or directory")
    check_chunk_rows(chunk_rows)


def fsync_write(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename: a finished file is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_write_parquet(df: pl.DataFrame, path: Path) -> None:
    try:
        fsync_write(path, df.write_parquet)
    except pl.exceptions.PolarsError as e:  # polars reports a full disk as ComputeError "... (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        raise OSError(int(m.group(1)), os.strerror(int(m.group(1)))) from None


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


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_path(parts: Path, i: int) -> Path:
    return parts / f"part-{i:06d}.parquet"


def n_chunks(total: int, chunk_rows: int) -> int:
    return (total + chunk_rows - 1) // chunk_rows


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


def check_parts(parts: Path, total: int, chunk_rows: int) -> int:
    """Validate every part against the chunk plan; returns how many leading chunks are done."""
    n = n_chunks(total, chunk_rows)
    done = 0
    for f in sorted(parts.glob("part-*.parquet")):
        i = int(f.stem.split("-")[1]) if f.stem.split("-")[1].isdigit() else -1
        want = min(chunk_rows, total - i * chunk_rows) if 0 <= i < n else None
        got = _part_rows(f)
        if want is None or got != want:
            raise SafetyScopeError(f"{f} holds {got if got is not None else 'no readable'} rows where the chunk plan "
                                   f"needs {want if want is not None else 'no such part'}; delete that file to "
                                   "recompute it (or delete the whole .parts directory to start over)")
    while part_path(parts, done).exists():
        done += 1
    return done


def check_outputs(out: Path, inputs: list, *, overwrite: bool) -> Path:
    """Before any work: OUTPUT and its parts directory are places this run may write; returns the parts dir."""
    check_output(out, inputs=inputs, overwrite=overwrite)
    parts = parts_dir(out)
    check_output(parts, inputs=inputs, overwrite=True, kind="parts directory", reused=True)
    return parts


@contextlib.contextmanager
def open_parts(out: Path, manifest_fn) -> Iterator[Path]:
    """Hold OUTPUT's lock, then create the parts directory with ``manifest_fn()`` or check an existing one
    against it (computed under the lock: it may hash the input). A run that wrote no part leaves nothing
    behind, else the corrected command would be refused as another run's."""
    parts = parts_dir(out)
    with output_lock(out):
        manifest = manifest_fn()
        created = not parts.exists()
        if not created:
            old = _read_manifest(parts)
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if diff:
                raise SafetyScopeError(f"{parts} holds an interrupted run with another {', '.join(diff)}; rerun it "
                                       f"with the same settings and input, or delete {parts} to start over")
        else:
            with output_errors(parts):
                parts.mkdir(parents=True)
                mark(parts)
                fsync_write(parts / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        try:
            yield parts
        except BaseException:
            if created and parts.is_dir() and not any(parts.glob("part-*.parquet")):
                shutil.rmtree(parts, ignore_errors=True)
            raise


def write_part(parts: Path, i: int, df: pl.DataFrame) -> None:
    with output_errors(parts, RESUME_HINT):
        fsync_write_parquet(df, part_path(parts, i))


def write_chunks(parts: Path, results: Iterable[tuple[int, pl.DataFrame, int | None]], *, total: int, done_rows: int,
                 desc: str, progress: bool = True) -> dict:
    """Write each ``(chunk index, result, tokens or None)`` as it comes, with a progress bar in rows (and
    tokens/s when tokens are given). Returns this run's rows, tokens and seconds."""
    t0, rows, tokens = time.perf_counter(), 0, 0
    with tqdm(total=total, initial=min(done_rows, total), unit="rows", disable=not progress,
              desc=desc) as bar:  # closed on errors too, so the error line starts on its own line
        for i, df, n_tok in results:
            write_part(parts, i, df)
            rows += df.height
            bar.update(df.height)
            if n_tok is not None:
                tokens += n_tok
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
    return {"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - t0}


def finished_parts(parts: Path, total: int, chunk_rows: int) -> list[Path]:
    """Every part of the plan, checked (nothing missing, forged or swapped in meanwhile), in order."""
    files = [part_path(parts, i) for i in range(n_chunks(total, chunk_rows))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise SafetyScopeError(f"parts missing after the run: {missing[:5]}; rerun to complete")
    check_parts(parts, total, chunk_rows)
    return files


def finish(parts: Path, files: list[Path], out: Path, fmt: str, *, keep_shards: bool = False) -> None:
    """OUTPUT from the finished parts; the parts directory is gone afterwards."""
    with output_errors(out, RESUME_HINT):
        if keep_shards:  # the directory itself becomes OUTPUT (one rename); the manifest served the resume only
            (parts / "manifest.json").unlink()
            replace(parts, out)
            return
        assemble(files, out, fmt)
    shutil.rmtree(parts)


def assemble(files: list[Path], out: Path, fmt: str) -> None:
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
            if writer is None:  # callers refuse empty inputs first; never write an output with no schema
                raise SafetyScopeError(f"{out}: no parts to assemble")
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
